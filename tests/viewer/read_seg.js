#!/usr/bin/env node
// Reads a DICOM SEG the way the OHIF viewer does (dcmjs's Cornerstone adapter) and prints what
// the viewer would show, as one JSON object on stdout.
//
//   node tests/viewer/read_seg.js SEG_FILE CT_DIR
//
// The SEG's frames are placed on the source CT images with
// dcmjs.adapters.Cornerstone.Segmentation.generateToolState and a metadata provider built from
// the CT files, as OHIF places them: by each frame's referenced SOP instance, and failing that
// by position. Output:
//   segments: [{number, label, voxels}]  voxels: set in dcmjs's decoded label maps
//   images: [{sop_instance_uid, voxels: {segment number: count}, sha256}] for every source
//     image with a segment on it; sha256 of its label map as one byte per pixel (segment
//     number, 0 background), so a caller can compare masks voxel for voxel
//   frames, frames_placed, frames_unmatched: SEG frames, those dcmjs put on a source image,
//     and those it could not match to one (it only says so in a warning, counted here)
//   labelmaps: label maps dcmjs needed (more than one only when segments overlap)
//   warnings: everything dcmjs warned about
// Exit status: 0 on success, 1 on any error (message on stderr), 2 on bad usage.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");

// dcmjs reports frames it cannot place only through console.warn (its loglevel logger binds
// console.warn when dcmjs is loaded), so the wrapper goes in before dcmjs is required.
const warnings = [];
const consoleWarn = console.warn.bind(console);
console.warn = (...args) => {
  warnings.push(args.map(String).join(" "));
  consoleWarn(...args);
};

const dcmjs = require("dcmjs");

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;
const UNMATCHED = /Image not present in stack, can't import frame/;
const PIXEL_DATA = "7FE00010";

function fail(message, status = 1) {
  process.stderr.write(`read_seg.js: ${message}\n`);
  process.exit(status);
}

// dcmjs's package.json is not among its exports; it lies one folder above its main script.
function dcmjsVersion() {
  const manifest = path.join(path.dirname(require.resolve("dcmjs")), "..", "package.json");
  return JSON.parse(fs.readFileSync(manifest, "utf8")).version;
}

function toArrayBuffer(buffer) {
  return buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
}

// A sequence that dcmjs naturalized as an object (one item) or an array of items.
function firstItem(sequence) {
  return Array.isArray(sequence) ? sequence[0] : sequence;
}

function listFiles(directory) {
  const files = [];
  for (const entry of fs.readdirSync(directory, { withFileTypes: true })) {
    const full = path.join(directory, entry.name);
    if (entry.isDirectory()) files.push(...listFiles(full));
    else if (entry.isFile()) files.push(full);
  }
  return files.sort();
}

// The CT headers (pixel data not read: the metadata provider needs none) of the series the SEG
// references, as OHIF would have that series' display set loaded. Files that are not DICOM are
// skipped, as a folder import skips them.
function readSources(ctDir, seriesUid) {
  const sources = [];
  let notDicom = 0;
  for (const file of listFiles(ctDir)) {
    let dicomData;
    try {
      dicomData = DicomMessage.readFile(toArrayBuffer(fs.readFileSync(file)), {
        untilTag: PIXEL_DATA,
        includeUntilTagValue: false,
      });
    } catch {
      notDicom += 1;
      continue;
    }
    const dataset = DicomMetaDictionary.naturalizeDataset(dicomData.dict);
    if (seriesUid && dataset.SeriesInstanceUID !== seriesUid) continue;
    if (Number(dataset.NumberOfFrames || 1) > 1) {
      throw new Error(`${file}: multi-frame source images are not supported by this script`);
    }
    sources.push({ file, dataset });
  }
  return { sources, notDicom };
}

// The Cornerstone metadata modules generateToolState asks for, from the CT headers.
function metadataProvider(byImageId) {
  return {
    get(type, imageId) {
      const ds = byImageId.get(imageId);
      if (!ds) return undefined;
      const iop = (ds.ImageOrientationPatient || []).map(Number);
      switch (type) {
        case "imagePlaneModule":
          return {
            frameOfReferenceUID: ds.FrameOfReferenceUID,
            rows: ds.Rows,
            columns: ds.Columns,
            rowCosines: iop.slice(0, 3),
            columnCosines: iop.slice(3, 6),
            imagePositionPatient: (ds.ImagePositionPatient || []).map(Number),
            rowPixelSpacing: ds.PixelSpacing ? Number(ds.PixelSpacing[0]) : undefined,
            columnPixelSpacing: ds.PixelSpacing ? Number(ds.PixelSpacing[1]) : undefined,
          };
        case "imagePixelModule":
          return { rows: ds.Rows, columns: ds.Columns };
        case "generalSeriesModule":
          return { seriesInstanceUID: ds.SeriesInstanceUID, modality: ds.Modality };
        case "sopCommonModule":
          return { sopInstanceUID: ds.SOPInstanceUID, sopClassUID: ds.SOPClassUID };
        case "instance":
          return ds;
        default:
          return undefined;
      }
    },
  };
}

function main(argv) {
  if (argv.length !== 2) fail("usage: node tests/viewer/read_seg.js SEG_FILE CT_DIR", 2);
  const [segFile, ctDir] = argv;
  if (!fs.existsSync(segFile)) fail(`no such SEG file: ${segFile}`);
  if (!fs.existsSync(ctDir) || !fs.statSync(ctDir).isDirectory()) {
    fail(`no such CT folder: ${ctDir}`);
  }

  const segBuffer = toArrayBuffer(fs.readFileSync(segFile));
  const seg = DicomMetaDictionary.naturalizeDataset(DicomMessage.readFile(segBuffer).dict);
  if (seg.Modality !== "SEG") fail(`${segFile}: Modality is ${seg.Modality}, not SEG`);
  const referenced = firstItem(seg.ReferencedSeriesSequence);
  const seriesUid = referenced ? referenced.SeriesInstanceUID : undefined;

  const { sources, notDicom } = readSources(ctDir, seriesUid);
  if (sources.length === 0) {
    fail(`${ctDir}: no CT image of the referenced series ${seriesUid || "(none named)"}`);
  }
  const byImageId = new Map(sources.map(({ file, dataset }) => [`dicomfile:${file}`, dataset]));
  const imageIds = [...byImageId.keys()];

  const state = dcmjs.adapters.Cornerstone.Segmentation.generateToolState(
    imageIds,
    segBuffer,
    metadataProvider(byImageId),
  );
  if (!state) fail("dcmjs's generateToolState returned nothing (see its warnings above)");
  const { labelmapBufferArray, segMetadata, segmentsOnFrame } = state;

  // segMetadata.data is indexed by segment number (index 0 is unused).
  const described = segMetadata.data.filter(Boolean);
  if (described.length > 255) fail(`${described.length} segments: more than a byte per pixel`);
  const totals = new Map(described.map((item) => [Number(item.SegmentNumber), 0]));
  const sliceLength = seg.Rows * seg.Columns;
  const images = [];
  imageIds.forEach((imageId, index) => {
    const perSegment = {};
    const mask = new Uint8Array(sliceLength);
    labelmapBufferArray.forEach((buffer, labelmap) => {
      const view = new Uint16Array(buffer, index * sliceLength * 2, sliceLength);
      for (let j = 0; j < sliceLength; j += 1) {
        const value = view[j];
        if (value === 0) continue;
        perSegment[value] = (perSegment[value] || 0) + 1;
        // Overlapping segments (none from a label map) keep the first label map's value.
        if (labelmap === 0) mask[j] = value;
      }
    });
    if (Object.keys(perSegment).length === 0) return;
    for (const [number, count] of Object.entries(perSegment)) {
      totals.set(Number(number), (totals.get(Number(number)) || 0) + count);
    }
    images.push({
      sop_instance_uid: byImageId.get(imageId).SOPInstanceUID,
      voxels: perSegment,
      sha256: crypto.createHash("sha256").update(mask).digest("hex"),
    });
  });

  const result = {
    dcmjs: dcmjsVersion(),
    seg_sop_instance_uid: seg.SOPInstanceUID,
    referenced_series_uid: seriesUid || null,
    source_images: imageIds.length,
    skipped_files: notDicom,
    frames: Number(seg.NumberOfFrames),
    frames_placed: segmentsOnFrame.reduce((n, segments) => n + (segments ? segments.length : 0), 0),
    frames_unmatched: warnings.filter((w) => UNMATCHED.test(w)).length,
    labelmaps: labelmapBufferArray.length,
    segments: described.map((item) => ({
      number: Number(item.SegmentNumber),
      label: item.SegmentLabel,
      voxels: totals.get(Number(item.SegmentNumber)) || 0,
    })),
    images,
    warnings,
  };
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

try {
  main(process.argv.slice(2));
} catch (error) {
  fail(error && error.stack ? error.stack : String(error));
}
