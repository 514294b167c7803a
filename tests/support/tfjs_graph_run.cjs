// Runs a TensorFlow.js graph model as TensorFlow.js itself does (pure-JavaScript CPU backend), for the
// test that proves models/tfjs_to_onnx.py's conversion equal to it
// (tests/integration/test_detector_conversion.py).
//
//   node tfjs_graph_run.cjs MODEL_JSON JOB_JSON
//
// JOB_JSON: {"input": "tower_0/images", "shape": [1, 512, 512, 3], "outputs": ["tower_0/detections", ...],
//            "images": ["in0.f32", ...]}: each image a raw little-endian float32 file of `shape`. For
// image i and output j it writes `<image>.<j>.f32` (float32) and prints one JSON line of the shapes.
// NODE_PATH names the folder holding @tensorflow/tfjs (installed by the test).
'use strict';

const fs = require('fs');
const path = require('path');
const tf = require('@tensorflow/tfjs');

async function main() {
  const [modelJson, jobJson] = process.argv.slice(2);
  const graph = JSON.parse(fs.readFileSync(modelJson, 'utf8'));
  const job = JSON.parse(fs.readFileSync(jobJson, 'utf8'));
  const folder = path.dirname(modelJson);
  const specs = [];
  const buffers = [];
  for (const group of graph.weightsManifest) {
    specs.push(...group.weights);
    for (const p of group.paths) buffers.push(fs.readFileSync(path.join(folder, p)));
  }
  const joined = Buffer.concat(buffers);
  const weightData = joined.buffer.slice(joined.byteOffset, joined.byteOffset + joined.byteLength);
  await tf.setBackend('cpu');
  await tf.ready();
  const model = await tf.loadGraphModel(tf.io.fromMemory({
    modelTopology: graph.modelTopology,
    weightSpecs: specs,
    weightData,
    format: graph.format,
    generatedBy: graph.generatedBy,
    convertedBy: graph.convertedBy,
    signature: graph.signature,
  }));
  const report = { backend: tf.getBackend(), version: tf.version.tfjs, images: [] };
  for (const image of job.images) {
    const raw = fs.readFileSync(image);
    const data = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
    const input = tf.tensor(data, job.shape, 'float32');
    const started = Date.now();
    let outputs = model.execute({ [job.input]: input }, job.outputs);
    if (!Array.isArray(outputs)) outputs = [outputs];
    const shapes = [];
    for (let j = 0; j < outputs.length; j++) {
      const values = await outputs[j].data();
      fs.writeFileSync(`${image}.${j}.f32`, Buffer.from(new Float32Array(values).buffer));
      shapes.push(outputs[j].shape);
    }
    report.images.push({ image, shapes, ms: Date.now() - started });
    tf.dispose([input, ...outputs]);
  }
  process.stdout.write(JSON.stringify(report) + '\n');
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + '\n');
  process.exit(1);
});
