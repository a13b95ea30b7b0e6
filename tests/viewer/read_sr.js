#!/usr/bin/env node
// Reads the node's measurement SR (TID 1500) with dcmjs, the OHIF viewer's DICOM library, and
// prints what it holds as one JSON object on stdout.
//
//   node tests/viewer/read_sr.js SR_FILE
//
// dcmjs parses and naturalizes the file (dcmjs.data); the TID 1500 tree is walked here:
// Imaging Measurements (126010) -> Measurement Group (125007) -> its content items. dcmjs's
// own TID 1500 reader (adapters.Cornerstone.MeasurementReport.generateToolState, what OHIF
// uses to turn an SR into annotations) maps only Cornerstone tools' measurements (lengths,
// ROIs drawn on an image); it is run too, to show it accepts the document, and what it found
// is counted. Output:
//   template: the root's TemplateIdentifier
//   groups: [{tracking_identifier, finding_site, measurements, evaluations, texts, points}]
//     measurements: NUM items [{concept, value, unit, finding_sites}]
//     evaluations: CODE items [{concept, value}] (e.g. "Measurement Failure")
//     texts: TEXT items [{concept, text}]
//     points: SCOORD3D items [{graphic_type, data, frame_of_reference}]
//     codes are {value, scheme, meaning}; a finding site {code, laterality}
//   cornerstone: {accepted, error, tool_measurements}
// Exit status: 0 on success, 1 on any error (message on stderr), 2 on bad usage.
"use strict";

const fs = require("fs");

const dcmjs = require("dcmjs");

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;
const IMAGING_MEASUREMENTS = "126010";
const MEASUREMENT_GROUP = "125007";
const TRACKING_IDENTIFIER = "112039";
const FINDING_SITE = "363698007";
const LATERALITY = "272741003";

function fail(message, status = 1) {
  process.stderr.write(`read_sr.js: ${message}\n`);
  process.exit(status);
}

// A sequence that dcmjs naturalized as an object (one item), an array of items, or nothing.
function items(sequence) {
  if (sequence === undefined || sequence === null) return [];
  return Array.isArray(sequence) ? sequence : [sequence];
}

function code(sequence) {
  const [item] = items(sequence);
  if (item === undefined) return null;
  return {
    value: String(item.CodeValue),
    scheme: String(item.CodingSchemeDesignator),
    meaning: String(item.CodeMeaning),
  };
}

function conceptIs(item, value) {
  const concept = code(item.ConceptNameCodeSequence);
  return concept !== null && concept.value === value;
}

// A finding site (CODE 363698007) with its laterality modifier, if it has one.
function findingSite(item) {
  const laterality = items(item.ContentSequence).find((i) => conceptIs(i, LATERALITY));
  return {
    code: code(item.ConceptCodeSequence),
    laterality: laterality === undefined ? null : code(laterality.ConceptCodeSequence),
  };
}

function measurement(item) {
  const [measured] = items(item.MeasuredValueSequence);
  return {
    concept: code(item.ConceptNameCodeSequence),
    value: measured === undefined ? null : Number(measured.NumericValue),
    unit: measured === undefined ? null : code(measured.MeasurementUnitsCodeSequence),
    finding_sites: items(item.ContentSequence)
      .filter((i) => conceptIs(i, FINDING_SITE))
      .map(findingSite),
  };
}

function group(container) {
  const content = items(container.ContentSequence);
  const tracking = content.find((i) => conceptIs(i, TRACKING_IDENTIFIER));
  const site = content.find((i) => i.ValueType === "CODE" && conceptIs(i, FINDING_SITE));
  return {
    tracking_identifier: tracking === undefined ? null : String(tracking.TextValue),
    finding_site: site === undefined ? null : findingSite(site),
    measurements: content.filter((i) => i.ValueType === "NUM").map(measurement),
    evaluations: content
      .filter((i) => i.ValueType === "CODE" && !conceptIs(i, FINDING_SITE))
      .map((i) => ({
        concept: code(i.ConceptNameCodeSequence),
        value: code(i.ConceptCodeSequence),
      })),
    texts: content
      .filter((i) => i.ValueType === "TEXT" && !conceptIs(i, TRACKING_IDENTIFIER))
      .map((i) => ({ concept: code(i.ConceptNameCodeSequence), text: String(i.TextValue) })),
    points: content
      .filter((i) => i.ValueType === "SCOORD3D")
      .map((i) => ({
        graphic_type: String(i.GraphicType),
        data: items(i.GraphicData).map(Number),
        frame_of_reference: String(i.ReferencedFrameOfReferenceUID),
      })),
  };
}

// OHIF's path from an SR to annotations: it must take the document, whatever it maps.
function cornerstone(dataset) {
  const log = console.log;
  console.log = () => {}; // the adapter logs each tool measurement it maps
  try {
    const found = dcmjs.adapters.Cornerstone.MeasurementReport.generateToolState(dataset);
    const count = Object.values(found).reduce((n, list) => n + list.length, 0);
    return { accepted: true, error: null, tool_measurements: count };
  } catch (error) {
    return { accepted: false, error: String(error.message || error), tool_measurements: 0 };
  } finally {
    console.log = log;
  }
}

function main(argv) {
  if (argv.length !== 1) fail("usage: read_sr.js SR_FILE", 2);
  const buffer = fs.readFileSync(argv[0]);
  const bytes = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
  const dataset = DicomMetaDictionary.naturalizeDataset(DicomMessage.readFile(bytes).dict);
  const [template] = items(dataset.ContentTemplateSequence);
  const report = items(dataset.ContentSequence).find((i) => conceptIs(i, IMAGING_MEASUREMENTS));
  if (report === undefined) fail(`${argv[0]}: no Imaging Measurements container`);
  const groups = items(report.ContentSequence)
    .filter((i) => i.ValueType === "CONTAINER" && conceptIs(i, MEASUREMENT_GROUP))
    .map(group);
  const out = {
    template: template === undefined ? null : String(template.TemplateIdentifier),
    groups,
    cornerstone: cornerstone(dataset),
  };
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

try {
  main(process.argv.slice(2));
} catch (error) {
  fail(error.stack || String(error));
}
