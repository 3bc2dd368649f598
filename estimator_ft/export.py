"""SavedModel export for serving: one signature contract for both training paths, TF Serving layout.

Signatures - the same names, inputs and outputs whichever path trained the model (C classes):

  serving_default  predict   image_bytes: string [b], encoded JPEG, PNG, GIF or BMP images
                             -> probabilities: float32 [b, C], class_index: int32 [b],
                                class_name: string [b], all_class_names: string [b, C]
  predict_images   predict   images: float32 [b, h, w, 3], decoded RGB in 0..255, any h and w
                             -> the same outputs
  classification   classify  inputs: string [b], serialized tf.Example protos whose bytes feature
                             `image_bytes` holds the encoded image (what TF Serving's Classify API
                             feeds) -> classes: string [b, C], scores: float32 [b, C]

With TF Serving's REST API: POST {"instances": [{"image_bytes": {"b64": "..."}}]} to
`:predict`, or {"examples": [{"image_bytes": {"b64": "..."}}]} to `:classify`.

Decoding, resizing and preprocessing run inside the graph through the evaluation pipeline's own
functions (data.decode_and_preprocess; data.resize_image + data.preprocess_for_model for decoded
images), so the served model sees exactly what validation saw.

Layout: `<export_base>/<version>/`, the version an integer (the Unix time of the export, kept
increasing), which is what TF Serving watches; it serves the highest version. A version is written
into a hidden staging folder beside it and renamed into place once complete, so a version folder
is never half-written; staging folders left by killed exports are removed by the next export.
Each version records `assets.extra/export_info.json` (global step, checkpoint, validation metrics).

TF Serving warm-up: given training images (ExportExtras.warmup_images, chosen by the job layer;
--serving_warmup_requests of them), a version also carries `assets.extra/tf_serving_warmup_requests`,
a TFRecord file of serialized `tensorflow.serving.PredictionLog` protos that TF Serving replays
when it loads the version, before it serves: one PredictRequest of `serving_default` per image,
plus one request of `predict_images` and one ClassificationRequest of `classification` with the
first image, so each signature's subgraph is warm before the first live request.


Estimator exporters (after each evaluation during training): `export/best` when the validation
metric `--export_best_metric` beats every version already in `export/best`; `export/latest` for
the final checkpoint (every evaluated one with --export_latest_every_epoch). In the training
process they share an EstimatorSavedModelWriter, whose serving graph is built once, into the
in-process evaluation graph (one ResNet50 for both).
The comparison uses the metrics recorded in those versions, so a resumed run never publishes a
worse model as the newest (= served) "best". Each keeps `--exports_to_keep` versions.
"""

import dataclasses
import datetime
import json
import logging
import math
import os
import socket
import time
from typing import Callable, Optional, Sequence, Tuple

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
# The fingerprint writer that tf.saved_model.save uses (TF 2.15 has no public one); called directly
# because its Python wrapper logs an INFO line through absl on every export.
from tensorflow.python.eager import context as eager_context  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting as fingerprinting_pywrap  # pylint: disable=g-direct-tensorflow-import
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2
# The signature-def builders Estimator.export_saved_model uses (EstimatorSavedModelWriter).
from tensorflow_estimator.python.estimator.export import export_lib as estimator_export_lib

from estimator_ft import contract
from estimator_ft import image_formats
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft import serving
from estimator_ft import storage
from estimator_ft.config import Config
from estimator_ft.data import images as images_lib

logger = logging.getLogger("estimator_ft")

EXPORT_DIR = "export"
LATEST_EXPORTER = "latest"
BEST_EXPORTER = "best"
MANUAL_EXPORT = "manual"  # `estimator-ft export` without --export_dir
EXPORT_INFO_FILE = contract.EXPORT_INFO_FILE
FINGERPRINT_FILE = "fingerprint.pb"
# The name and place TF Serving reads warm-up requests from (tensorflow_serving/servables/
# tensorflow/saved_model_warmup_util): a TFRecord file of serialized PredictionLog protos.
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
# TF Serving reads at most this many warm-up records.
MAX_WARMUP_RECORDS = 1000

EXAMPLES_INPUT = "examples"
_IMAGES_RECEIVER = "images"
_EXAMPLES_RECEIVER = "examples"
# Estimator names the signature of an alternative receiver "<receiver>:<export output>". These
# become the contract's names; the others are dropped (among them a classify signature on raw
# bytes, which TF Serving's Classify API - it feeds serialized tf.Examples - could never call).
_ESTIMATOR_SIGNATURES = {
    contract.SERVING_SIGNATURE: contract.SERVING_SIGNATURE,
    contract.IMAGES_SIGNATURE: f"{_IMAGES_RECEIVER}:{contract.SERVING_SIGNATURE}",
    contract.CLASSIFY_SIGNATURE: f"{_EXAMPLES_RECEIVER}:{contract.CLASSIFY_SIGNATURE}",
}

# export_best_metric -> (eval metric key, True if lower is better).
_BEST_METRICS = {
    "loss": (model_fn_lib.EXAMPLE_LOSS, True),
    "accuracy": ("accuracy", False),
    "auc": ("auc", False),
}

_STAGING_PREFIX = ".tmp-"
# Another exporter may publish the version we picked between our choice and the rename.
_PUBLISH_ATTEMPTS = 5


# ---------------------------------------------------------------- input pipelines of the signatures

def preprocess_image_bytes(image_bytes, image_size: int,
                           max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS) -> tf.Tensor:
  """string [b] of encoded images -> float32 [b, size, size, 3]: the evaluation pipeline's path.

  An image whose header declares more than `max_pixels` pixels fails the whole request with
  InvalidArgumentError ("image of W x H pixels is over the limit ...") before anything of it is
  decoded: one request cannot make the server allocate gigabytes.
  """
  return tf.map_fn(lambda encoded: images_lib.decode_and_preprocess(encoded, image_size, max_pixels),
                   image_bytes,
                   fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


def preprocess_images(images, image_size: int) -> tf.Tensor:
  """float [b, h, w, 3] RGB 0..255 -> float32 [b, size, size, 3]: the pipeline's resize + preprocess."""
  return tf.map_fn(
      lambda image: images_lib.preprocess_for_model(images_lib.resize_image(image, image_size)),
      tf.cast(images, tf.float32),
      fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


def image_bytes_from_examples(serialized_examples) -> tf.Tensor:
  """string [b] serialized tf.Example -> string [b], their encoded images."""
  features = {contract.EXAMPLE_IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)}
  return tf.io.parse_example(serialized_examples, features)[contract.EXAMPLE_IMAGE_FEATURE]


def serving_input_receiver_fn(image_size: int,
                              max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS):
  """The Estimator's receiver: encoded bytes by default; decoded images and tf.Examples besides."""

  def receiver_fn():
    # Each signature feeds exactly one of these inputs; the others keep their default, an empty
    # batch, so `features` is the fed batch passed through that input's own pipeline. (The
    # examples feed image_bytes through its default, so classify decodes like predict.)
    examples = tf.compat.v1.placeholder_with_default(
        tf.zeros([0], tf.string), [None], name=EXAMPLES_INPUT)
    image_bytes = tf.compat.v1.placeholder_with_default(
        image_bytes_from_examples(examples), [None], name=contract.IMAGE_BYTES_INPUT)
    images = tf.compat.v1.placeholder_with_default(
        tf.zeros([0, image_size, image_size, 3]), [None, None, None, 3], name=contract.IMAGES_INPUT)
    features = tf.concat([preprocess_image_bytes(image_bytes, image_size, max_pixels),
                          preprocess_images(images, image_size)], axis=0)
    return tf.estimator.export.ServingInputReceiver(
        features={contract.FEATURE_KEY: features},
        receiver_tensors={contract.IMAGE_BYTES_INPUT: image_bytes},
        receiver_tensors_alternatives={
            _IMAGES_RECEIVER: {contract.IMAGES_INPUT: images},
            _EXAMPLES_RECEIVER: {EXAMPLES_INPUT: examples},
        })

  return receiver_fn


# ---------------------------------------------------------------- what a version carries besides

@dataclasses.dataclass(frozen=True)
class ExportExtras:
  """What an export writes into a version besides the SavedModel.

  The job layer chooses the images (training-split images, encoded; data.samples):
    warmup_images          -> assets.extra/tf_serving_warmup_requests (none: no file)
    representative_images  int8 calibration images for write_beside (export_tflite.py)
  and a training path may add
    write_beside           (version_dir, checkpoint_path or None) -> dict: writes more files into
                           the version while it is still in its staging folder (--export_tflite:
                           model.tflite + labels.txt), so they are published with it or not at
                           all; what it returns is recorded in export_info.json.
  """
  warmup_images: Tuple[bytes, ...] = ()
  representative_images: Tuple[bytes, ...] = ()
  write_beside: Optional[Callable[[str, Optional[str]], dict]] = None

  def replace(self, **changes) -> "ExportExtras":
    return dataclasses.replace(self, **changes)


NO_EXTRAS = ExportExtras()


def _example(image_bytes: bytes) -> tf.train.Example:
  feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes]))
  return tf.train.Example(features=tf.train.Features(
      feature={contract.EXAMPLE_IMAGE_FEATURE: feature}))


def warmup_logs(images: Sequence[bytes], image_size: int) -> list:
  """The PredictionLog protos of the warm-up file for these encoded images (see module doc)."""
  images = list(images)[:MAX_WARMUP_RECORDS - 2]
  logs = []
  for image in images:
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = contract.SERVING_SIGNATURE
    request.inputs[contract.IMAGE_BYTES_INPUT].CopyFrom(tf.make_tensor_proto([image], tf.string))
    logs.append(prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)))
  if images:
    # The decoded-image signature, fed what a client would send: the image at the training size
    # (the signature resizes any size; a full-size photo would make a needlessly large file).
    decoded = images_lib.resize_image(images_lib.decode_rgb(images[0]), image_size)[tf.newaxis]
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = contract.IMAGES_SIGNATURE
    request.inputs[contract.IMAGES_INPUT].CopyFrom(tf.make_tensor_proto(decoded.numpy()))
    logs.append(prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)))
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.signature_name = contract.CLASSIFY_SIGNATURE
    classify.input.example_list.examples.append(_example(images[0]))
    logs.append(prediction_log_pb2.PredictionLog(
        classify_log=prediction_log_pb2.ClassifyLog(request=classify)))
  return logs


def write_warmup_requests(saved_model_dir: str, images: Sequence[bytes], image_size: int) -> str:
  """Writes assets.extra/tf_serving_warmup_requests into a (staging) SavedModel folder."""
  path = os.path.join(saved_model_dir, WARMUP_FILE)
  storage.makedirs(os.path.dirname(path))
  with tf.io.TFRecordWriter(path) as writer:
    for log in warmup_logs(images, image_size):
      writer.write(log.SerializeToString())
  return path


# ---------------------------------------------------------------- publishing versions

def _staging_owner(name: str):
  """(host, pid) encoded in a staging folder name, or None for anything else."""
  if not name.startswith(_STAGING_PREFIX):
    return None
  parts = name[len(_STAGING_PREFIX):].rsplit("-", 2)
  if len(parts) != 3 or not parts[1].isdigit():
    return None
  return parts[0], int(parts[1])


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's live process
  return True


def remove_stale_staging(export_base: str) -> list:
  """Deletes staging folders whose exporting process (on this host) is gone; returns them.

  Staging folders of other hosts (a shared file system) are left alone: their owner cannot be
  checked from here, and TF Serving ignores them anyway.
  """
  removed = []
  host = socket.gethostname()
  for name in storage.listdir(export_base):
    owner = _staging_owner(name)
    if owner and owner[0] == host and not _process_alive(owner[1]):
      path = os.path.join(export_base, name)
      storage.rmtree(path)
      removed.append(path)
  if removed:
    logger.info("Removed %d staging folder(s) of killed exports in %s", len(removed), export_base)
  return removed


def remove_old_versions(export_base: str, keep: int) -> list:
  """Deletes all but the newest `keep` versions; returns the deleted paths."""
  versions = serving.version_dirs(export_base)
  doomed = [path for _, path in versions[:max(len(versions) - keep, 0)]]
  for path in doomed:
    storage.rmtree(path)
  return doomed


def _rewrite_signatures(saved_model_dir: str, edit) -> None:
  """Applies `edit(signature_def_map)` to a SavedModel's signatures, in place."""
  path = os.path.join(saved_model_dir, contract.SAVED_MODEL_FILE)
  saved_model = saved_model_pb2.SavedModel()
  saved_model.ParseFromString(storage.read_bytes(path))
  for meta_graph in saved_model.meta_graphs:
    edit(meta_graph.signature_def)
  storage.write_bytes(path, saved_model.SerializeToString(deterministic=True))
  # The fingerprint hashes saved_model.pb, so it is written after the edit; the Estimator's TF1
  # builder writes none at all, and loaders log its absence.
  storage.write_bytes(os.path.join(saved_model_dir, FINGERPRINT_FILE),
                      fingerprinting_pywrap.CreateFingerprintDef(saved_model_dir))


def _select_estimator_signatures(signature_map) -> None:
  selected = {name: signature_map[source] for name, source in _ESTIMATOR_SIGNATURES.items()}
  for name in list(signature_map):
    del signature_map[name]
  for name, signature in selected.items():
    signature_map[name].CopyFrom(signature)


def _mark_classify_method(signature_map) -> None:
  # tf.saved_model.save labels every signature "predict"; TF Serving's Classify API only calls a
  # signature labelled "classify".
  signature_map[contract.CLASSIFY_SIGNATURE].method_name = tf.saved_model.CLASSIFY_METHOD_NAME


def next_version(export_base: str) -> int:
  """The Unix time, or one more than the newest version if that is not older (clock skew, or
  two exports within a second): TF Serving serves the highest number, so it must be the newest.
  Every numbered entry counts (a TFLite export's versions hold no SavedModel)."""
  newest = max((int(name) for name in storage.listdir(export_base) if name.isdigit()), default=0)
  return max(int(time.time()), newest + 1)


def publish_version(export_base: str, write_version: Callable[[str], str]) -> str:
  """Publishes one version folder through a staging folder; returns the published folder.

  `write_version(staging_dir)` writes the complete version somewhere inside staging_dir (which
  it may also use for scratch files) and returns its folder; that folder is renamed into
  export_base/<next version> in one step, so the version appears complete or not at all. The
  staging folder goes whatever happens; one left by a killed process goes with the next export.
  On a non-local file system the version's files are renamed one by one, saved_model.pb last
  (storage.replace_tree), so TF Serving never finds a saved_model.pb with files missing.
  """
  storage.makedirs(export_base)
  remove_stale_staging(export_base)
  staging = storage.make_unique_dir(
      export_base, f"{_STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-")
  try:
    version_dir = write_version(staging)
    for attempt in range(_PUBLISH_ATTEMPTS):
      target = os.path.join(export_base, str(next_version(export_base)))
      try:
        # Locally one rename: the version folder appears complete or not at all.
        storage.replace_tree(version_dir, target, last=contract.SAVED_MODEL_FILE)
        break
      except OSError:
        if attempt == _PUBLISH_ATTEMPTS - 1 or not storage.exists(target):
          raise
  finally:
    storage.rmtree(staging)
  return target


def _publish(export_base: str, write_saved_model, finish_signatures, info: dict,
             extras: ExportExtras, image_size: int, checkpoint_path=None) -> str:
  """Writes one SavedModel version through a staging folder; returns the published version folder.

  `write_saved_model(staging_dir)` writes a SavedModel somewhere inside staging_dir and returns
  its path; `finish_signatures` edits its signature map before it is published. The warm-up
  requests and whatever extras.write_beside writes go into it before the rename.
  """

  def write(staging):
    saved_model_dir = write_saved_model(staging)
    _rewrite_signatures(saved_model_dir, finish_signatures)
    # Eagerly: the Estimator runs its exporters inside the training session's graph, which is
    # finalized (its own export builds a graph of its own); the Keras path is eager already.
    with eager_context.eager_mode():
      if extras.warmup_images:
        write_warmup_requests(saved_model_dir, extras.warmup_images, image_size)
      if extras.write_beside is not None:
        info["beside"] = extras.write_beside(saved_model_dir, checkpoint_path)
    info_path = os.path.join(saved_model_dir, EXPORT_INFO_FILE)
    storage.makedirs(os.path.dirname(info_path))
    storage.write_bytes(info_path, json.dumps(info, indent=2, sort_keys=True).encode("utf-8"))
    return saved_model_dir

  return publish_version(export_base, write)


def read_export_info(version_dir: str) -> dict:
  try:
    return storage.read_json(os.path.join(version_dir, EXPORT_INFO_FILE), {})
  except (OSError, ValueError, tf.errors.OpError):
    return {}


def _export_info(config: Config, class_names, global_step, checkpoint_path, metrics) -> dict:
  return {
      "path": config.path,
      "class_names": list(class_names),
      "image_size": config.image_size,
      # What the signatures refuse (serving.Predictor checks files against it before decoding).
      contract.MAX_IMAGE_PIXELS_INFO: config.max_image_pixels,
      "global_step": global_step,
      "checkpoint": checkpoint_path,
      "metrics": metrics,
      "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


# ---------------------------------------------------------------- Estimator path

class EstimatorSavedModelWriter:
  """Writes Estimator-path SavedModels of checkpoints from one serving graph, built once.

  `Estimator.export_saved_model` builds the serving graph (ResNet50 and the decode pipelines)
  anew for every export: about 4 s on 2 cores, twice per epoch with the latest and best
  exporters. This builds the same graph once - the same receiver, the model_fn's PREDICT spec,
  the signature defs `Estimator._add_meta_graph_for_mode` builds, a sharded saver and the
  local-init main op - keeps a session on it, and per export only restores the checkpoint and
  writes the SavedModel.

  The serving graph is its own (built at the first write) or, through `build_in`, part of the
  in-process evaluation graph, which already holds the model: then only the receiver and the
  prediction outputs (and the saver) are added: 0.9 s instead of 2.7 s at 64 px, measured. Each
  SavedModel holds only what serving needs of the graph (_ServingSaver), whichever it is.
  """

  def __init__(self, model_fn, config: Config, session_config=None):
    self._model_fn = model_fn
    self._config = config
    self._session_config = session_config
    self._graph = None
    self._session, self._owns_session = None, True

  @property
  def built(self) -> bool:
    return self._graph is not None

  def build_in(self, graph, session) -> tf.compat.v1.train.Saver:
    """Adds the serving graph to `graph`, whose model_fn built the model for another mode (with
    model.OneModelPerGraph), and exports through `session` on it (the caller's: it closes it).
    Returns the saver of every variable of `graph`, for the caller to restore with: an export
    after an evaluation of the same checkpoint then restores through executors already built."""
    with graph.as_default():
      known = set(_variable_names(tf.compat.v1.global_variables()))
      self._add_serving_graph()
      added = set(_variable_names(tf.compat.v1.global_variables())) - known
    if added:
      raise ValueError(f"The model_fn's PREDICT call created {len(added)} new variables (e.g. "
                       f"{sorted(added)[0]}) in a graph that already holds the model: build its "
                       "model_fn with build_model=model.OneModelPerGraph().")
    self._session, self._owns_session = session, False
    self._graph = graph  # last: a build that failed half-way is retried, never used
    return self._saver

  def _build(self):
    graph = tf.Graph()
    with graph.as_default():
      tf.compat.v1.train.create_global_step()
      tf.compat.v1.random.set_random_seed(self._config.seed)
      self._add_serving_graph()
    self._graph = graph  # last: a build that failed half-way is retried, never used

  def _add_serving_graph(self):
    graph = tf.compat.v1.get_default_graph()
    # What Scaffold.default_local_init_op initializes: its main op takes the serving graph's own.
    local_init_keys = (tf.compat.v1.GraphKeys.LOCAL_VARIABLES,
                       tf.compat.v1.GraphKeys.TABLE_INITIALIZERS,
                       tf.compat.v1.GraphKeys.LOCAL_RESOURCES)
    before = {key: {id(item) for item in graph.get_collection(key)} for key in local_init_keys}
    receiver = serving_input_receiver_fn(self._config.image_size, self._config.max_image_pixels)()
    with model_lib.restored_variables_scope():  # each export restores them all first
      spec = self._model_fn(receiver.features, None, tf.estimator.ModeKeys.PREDICT)
    export_outputs = estimator_export_lib.export_outputs_for_mode(
        mode=spec.mode, serving_export_outputs=spec.export_outputs,
        predictions=spec.predictions, loss=spec.loss, metrics=spec.eval_metric_ops)
    self._signature_def_map = estimator_export_lib.build_all_signature_defs(
        receiver.receiver_tensors, export_outputs, receiver.receiver_tensors_alternatives,
        serving_only=True)
    local_variables, tables, resources = (
        [item for item in graph.get_collection(key) if id(item) not in before[key]]
        for key in local_init_keys)
    self._main_op = tf.group(tf.compat.v1.variables_initializer(local_variables),
                             tf.group(tables), tf.group([r.create for r in resources]))
    keep = [tensor_info.name for signature in self._signature_def_map.values()
            for tensor_info in (list(signature.inputs.values()) + list(signature.outputs.values()))]
    keep.append(self._main_op.name)
    for variable in tf.compat.v1.global_variables() + local_variables:
      keep.extend(_graph_names(variable))
    self._saver = _ServingSaver(keep, sharded=True)

  def write(self, staging: str, checkpoint_path: str) -> str:
    """The SavedModel of `checkpoint_path`, written into a new folder in `staging`."""
    if self._graph is None:
      self._build()
    if self._session is None:
      self._session = tf.compat.v1.Session(graph=self._graph, config=self._session_config)
    saved_model_dir = os.path.join(staging, "saved_model")
    # Its own graph as the default: a saver built in graph mode would otherwise restore eagerly.
    with self._graph.as_default():
      self._saver.restore(self._session, checkpoint_path)
      # The builder records its main op in a graph collection, and a loader refuses a SavedModel
      # with two: clear what the previous export left there.
      self._graph.clear_collection(tf.compat.v1.saved_model.MAIN_OP_KEY)
      builder = tf.compat.v1.saved_model.Builder(saved_model_dir)
      builder.add_meta_graph_and_variables(
          self._session, [tf.saved_model.SERVING], signature_def_map=self._signature_def_map,
          main_op=self._main_op, saver=self._saver, strip_default_attrs=True)
      builder.save(as_text=False)
    return saved_model_dir

  def close(self):
    if self._session is not None and self._owns_session:
      self._session.close()


def _variable_names(variables) -> list:
  return [variable.op.name for variable in variables]


class _ServingSaver(tf.compat.v1.train.Saver):
  """A Saver whose exported MetaGraphDef (what a SavedModel builder writes) holds only the part of
  its graph that serving needs: the nodes `keep` names (the signatures' inputs and outputs, the
  main op, the serving graph's variables) and this saver's, with what they depend on, the
  functions they call, and the collections that refer to nothing else. A serving graph built
  into the evaluation graph would otherwise carry the validation pipeline and the metrics; a
  serving graph of its own loses nothing.
  """

  def __init__(self, keep, **saver_kwargs):
    super().__init__(**saver_kwargs)
    saver_def = self.saver_def
    self._keep = {name.split(":")[0] for name in list(keep) + [
        saver_def.filename_tensor_name, saver_def.save_tensor_name, saver_def.restore_op_name]}
    self._pruned = None  # (graph version, GraphDef): the graph gets no ops between exports

  def export_meta_graph(self, filename=None, collection_list=None, as_text=False,
                        export_scope=None, clear_devices=False, clear_extraneous_savers=False,
                        strip_default_attrs=False, save_debug_info=False):
    graph = tf.compat.v1.get_default_graph()
    if self._pruned is None or self._pruned[0] != graph.version:
      self._pruned = (graph.version, _subgraph(graph.as_graph_def(add_shapes=True), self._keep))
    graph_def = self._pruned[1]
    kept = {node.name for node in graph_def.node}
    collections = [key for key in graph.get_all_collection_keys()
                   if (collection_list is None or key in collection_list)
                   and all(_refers_only_to(item, kept) for item in graph.get_collection(key))]
    return tf.compat.v1.train.export_meta_graph(
        filename=filename, graph_def=graph_def, saver_def=self.saver_def,
        collection_list=collections, as_text=as_text, export_scope=export_scope,
        clear_devices=clear_devices, clear_extraneous_savers=clear_extraneous_savers,
        strip_default_attrs=strip_default_attrs, save_debug_info=save_debug_info)


def _graph_names(item) -> set:
  """The graph nodes a collection item refers to; empty for an item that is not of a graph."""
  if isinstance(item, tf.Variable):
    proto = item.to_proto()
    return {name.split(":")[0] for name in (proto.variable_name, proto.initializer_name,
                                            proto.snapshot_name, proto.initial_value_name) if name}
  if isinstance(item, tf.Tensor):
    return {item.op.name}
  if isinstance(item, tf.Operation):
    return {item.name}
  return set()


def _refers_only_to(item, node_names) -> bool:
  names = _graph_names(item)
  return bool(names) and names <= node_names


def _subgraph(graph_def, keep):
  """graph_def's nodes named in `keep` and every node they depend on (data and control inputs),
  in their order, with the library functions those nodes call (and the functions those call)."""
  nodes = {node.name: node for node in graph_def.node}
  reached, pending = set(), list(keep)
  while pending:
    name = pending.pop()
    if name not in reached:
      reached.add(name)
      pending.extend(source.lstrip("^").split(":")[0] for source in nodes[name].input)
  subgraph = type(graph_def)()
  subgraph.versions.CopyFrom(graph_def.versions)
  subgraph.node.extend(node for node in graph_def.node if node.name in reached)
  functions = {function.signature.name: function for function in graph_def.library.function}
  gradients = {gradient.function_name: gradient for gradient in graph_def.library.gradient}
  called, pending = set(), [list(subgraph.node)]
  while pending:
    for node in pending.pop():
      names = [node.op] + [attr.func.name for attr in node.attr.values() if attr.HasField("func")]
      names += [func.name for attr in node.attr.values() for func in attr.list.func]
      for name in names:
        if name in functions and name not in called:
          called.add(name)
          pending.append(functions[name].node_def)
          if name in gradients:  # its gradient function is walked as a node calling it
            pending.append([type(node)(op=gradients[name].gradient_func)])
  subgraph.library.function.extend(functions[name] for name in sorted(called))
  subgraph.library.gradient.extend(gradients[name] for name in sorted(called) if name in gradients)
  return subgraph


def export_estimator(estimator, config: Config, class_names, export_base: str,
                     checkpoint_path=None, metrics=None, extras: ExportExtras = NO_EXTRAS,
                     writer=None) -> str:
  """Exports `checkpoint_path` (default: the latest) as a new version under export_base.

  writer: an EstimatorSavedModelWriter to write it with (no graph rebuild); without one, the
  Estimator's own export_saved_model builds the graph for this export alone.
  """
  checkpoint_path = checkpoint_path or estimator.latest_checkpoint()
  if checkpoint_path is None:
    raise ValueError(f"{estimator.model_dir} holds no checkpoint to export: train first.")

  def write(staging):
    if writer is not None:
      return writer.write(staging, checkpoint_path)
    written = estimator.export_saved_model(
        staging, serving_input_receiver_fn(config.image_size, config.max_image_pixels),
        checkpoint_path=checkpoint_path)
    return written.decode() if isinstance(written, bytes) else written

  info = _export_info(config, class_names, checkpoint_step(checkpoint_path), checkpoint_path,
                      metrics)
  return _publish(export_base, write, _select_estimator_signatures, info, extras,
                  config.image_size, checkpoint_path)


def checkpoint_step(checkpoint_path: str):
  """The step in a checkpoint name (model.ckpt-120, ckpt-120): both paths number them by step."""
  suffix = checkpoint_path.rsplit("-", 1)[-1]
  return int(suffix) if suffix.isdigit() else None


def best_metric(config: Config):
  """(eval metric key, lower_is_better) of --export_best_metric."""
  return _BEST_METRICS[config.export_best_metric]


def improves_on_best(export_base: str, metric_key: str, lower_is_better: bool, value) -> bool:
  """True if `value` beats the metric recorded by every version under export_base."""
  if value is None or not math.isfinite(float(value)):
    return False
  recorded = []
  for _, path in serving.version_dirs(export_base):
    metrics = read_export_info(path).get("metrics") or {}
    if metrics.get(metric_key) is not None:
      recorded.append(float(metrics[metric_key]))
  if not recorded:
    return True
  best = min(recorded) if lower_is_better else max(recorded)
  return value < best if lower_is_better else value > best


class _VersionExporter(tf.estimator.Exporter):
  """Exports after an evaluation into model_dir/export/<name>/<version>, keeping the newest N."""

  def __init__(self, name: str, config: Config, class_names, extras: ExportExtras = NO_EXTRAS,
               writer=None):
    self._name = name
    self._config = config
    self._class_names = tuple(class_names)
    self._extras = extras
    self._writer = writer

  @property
  def name(self):
    return self._name

  def wanted(self, export_path: str, metrics: dict, is_the_final_export: bool) -> bool:
    raise NotImplementedError

  def export(self, estimator, export_path, checkpoint_path, eval_result, is_the_final_export):
    metrics = {key: float(value) for key, value in eval_result.items() if key != "global_step"}
    if not self.wanted(export_path, metrics, is_the_final_export):
      return None
    path = export_estimator(estimator, self._config, self._class_names, export_path,
                            checkpoint_path, metrics, self._extras, self._writer)
    remove_old_versions(export_path, self._config.exports_to_keep)
    logger.info("Exported %s model: %s", self._name, path)
    return path


class LatestExporter(_VersionExporter):
  """The final checkpoint; every evaluated one with --export_latest_every_epoch."""

  def wanted(self, export_path, metrics, is_the_final_export):
    return is_the_final_export or self._config.export_latest_every_epoch


class BestExporter(_VersionExporter):
  """Checkpoints whose validation metric beats every version already exported here."""

  def wanted(self, export_path, metrics, is_the_final_export):
    key, lower_is_better = best_metric(self._config)
    return improves_on_best(export_path, key, lower_is_better, metrics.get(key))


def make_exporters(config: Config, class_names, extras: ExportExtras = NO_EXTRAS,
                   writer=None) -> list:
  """The exporters run after each evaluation: latest and best (sharing `writer`, if given).

  Both carry the warm-up requests; only `best` gets extras.write_beside (--export_tflite).
  """
  if not config.export_during_training:
    return []
  if config.export_best_metric == "auc" and len(class_names) != 2:
    raise ValueError(f"--export_best_metric=auc needs two classes (there are {len(class_names)}); "
                     "use loss or accuracy.")
  return [LatestExporter(LATEST_EXPORTER, config, class_names, extras.replace(write_beside=None),
                         writer),
          BestExporter(BEST_EXPORTER, config, class_names, extras, writer)]


def latest_export_path(model_dir: str):
  """The final export of a training run: the newest version of export/latest (else of best).

  `latest` is the model of the final checkpoint, the one results.json's final evaluation
  measured. The best model by validation is always the newest version of model_dir/export/best.
  """
  for name in (LATEST_EXPORTER, BEST_EXPORTER):
    newest = serving.newest_version(os.path.join(model_dir, EXPORT_DIR, name))
    if newest:
      return newest
  return None


# ---------------------------------------------------------------- Keras path

def export_keras_model(model: tf.keras.Model, config: Config, class_names, export_base: str,
                       global_step=None, metrics=None, extras: ExportExtras = NO_EXTRAS) -> str:
  """Exports a Keras model with the Estimator export's signatures; returns the version folder."""
  class_names = tuple(class_names)
  size = config.image_size

  def predictions(preprocessed):
    return model_fn_lib.prediction_outputs(model(preprocessed, training=False), class_names)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=contract.IMAGE_BYTES_INPUT)])
  def predict_image_bytes(image_bytes):
    return predictions(preprocess_image_bytes(image_bytes, size, config.max_image_pixels))

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.float32, name=contract.IMAGES_INPUT)])
  def predict_images(images):
    return predictions(preprocess_images(images, size))

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.string, name=tf.saved_model.CLASSIFY_INPUTS)])
  def classify(inputs):
    outputs = predictions(preprocess_image_bytes(image_bytes_from_examples(inputs), size,
                                                 config.max_image_pixels))
    return {tf.saved_model.CLASSIFY_OUTPUT_CLASSES: outputs[contract.ALL_CLASS_NAMES],
            tf.saved_model.CLASSIFY_OUTPUT_SCORES: outputs[contract.PROBABILITIES]}

  # A plain module holding the weights: saving the Keras model object itself would also trace
  # and serialise every layer's call for Keras reloading, which serving never uses.
  module = tf.Module(name="serving")
  module.weights = list(model.weights)
  signatures = {contract.SERVING_SIGNATURE: predict_image_bytes,
                contract.IMAGES_SIGNATURE: predict_images,
                contract.CLASSIFY_SIGNATURE: classify}

  def write(staging):
    saved_model_dir = os.path.join(staging, "saved_model")
    tf.saved_model.save(module, saved_model_dir, signatures=signatures)
    return saved_model_dir

  info = _export_info(config, class_names, global_step, None, metrics)
  return _publish(export_base, write, _mark_classify_method, info, extras, config.image_size)
