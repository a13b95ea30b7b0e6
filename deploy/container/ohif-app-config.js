// OHIF v3's configuration in deploy/container/compose.yaml, mounted over the upstream image's
// /usr/share/nginx/html/app-config.js. The viewer reads Orthanc's DICOMweb through the proxy
// (viewer-proxy.conf.in) that also serves the viewer, so both come from one origin and the
// browser needs no CORS from Orthanc. Not run on the machine the node is developed on (no
// registry there to pull ohif/app from): deploy/README.md, "Containers".
/** @type {AppTypes.Config} */
window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (dicom-node PACS)',
        name: 'orthanc',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/wado',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
