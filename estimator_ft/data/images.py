"""Image ops of the pipeline: decode, resize, augment, preprocess - pure functions of their inputs.

Training, evaluation, serving and the benchmarks call these same functions, so an image is
decoded, resized and preprocessed identically wherever it is read.
"""

import tensorflow as tf

from estimator_ft import image_formats
from estimator_ft.data.split import DataError

# Random resized crop: keep at least half of the image, so a small object (the sample data's
# shapes) is rarely cut away entirely, with mild aspect changes that ResNet50 tolerates.
CROP_AREA_RANGE = (0.5, 1.0)
CROP_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)

# ResNet50's caffe-mode input statistics (keras.applications.imagenet_utils), in BGR order.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)
# [1, 1, in, out]: output channel k is input channel 2 - k (RGB -> BGR).
_RGB_TO_BGR_KERNEL = [[[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]]]


def decode_rgb(image_bytes, max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS) -> tf.Tensor:
  """Scalar string (JPEG, PNG, GIF, BMP) -> uint8 [h, w, 3] RGB at the file's own size.

  channels=3 turns grayscale into RGB and drops alpha; decode_image scales 16-bit PNGs to 8 bits;
  expand_animations=False keeps only the first GIF frame so every image has rank 3.
  An image whose header declares more than `max_pixels` pixels (see `header_pixels`) fails with
  InvalidArgumentError before the decoder allocates anything.
  """
  image_bytes = check_pixel_limit(image_bytes, max_pixels)
  return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)



def decode_image(image_bytes, image_size: int,
                 max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS) -> tf.Tensor:
  """Scalar string (JPEG, PNG, GIF, BMP) -> float32 [size, size, 3] RGB with values in 0..255."""
  return resize_image(decode_rgb(image_bytes, max_pixels), image_size)



# ---------------------------------------------------------------- the pixel limit, in graph ops

_HEADER_BYTES = 32


@tf.autograph.experimental.do_not_convert
def _header_word(header, start: int, length: int, byteorder: str) -> tf.Tensor:
  """int64: `length` bytes of the int64 [32] header from `start`, as an unsigned integer."""
  value = tf.constant(0, tf.int64)
  positions = range(start, start + length)
  for index in (positions if byteorder == "big" else reversed(positions)):
    value = value * 256 + header[index]
  return value


@tf.autograph.experimental.do_not_convert
def _starts_with(header, magic: bytes) -> tf.Tensor:
  return tf.reduce_all(tf.equal(header[:len(magic)], tf.constant(list(magic), tf.int64)))


@tf.autograph.experimental.do_not_convert
def _colour_table_bytes(packed) -> tf.Tensor:
  """A GIF colour table's size from the packed byte that announces it (0 when there is none)."""
  has_table = tf.not_equal(tf.bitwise.bitwise_and(packed, 0x80), 0)
  size = tf.bitwise.left_shift(tf.constant(3, tf.int64), tf.bitwise.bitwise_and(packed, 7) + 1)
  return tf.where(has_table, size, tf.constant(0, tf.int64))


# Sub-blocks skipped per loop iteration, unrolled: a while_loop iteration costs far more than
# the few ops of one hop (one hop per iteration made the walk ~8x slower than decoding the GIF).
_GIF_HOPS_PER_ITERATION = 16
_GIF_PADDING = 256 * _GIF_HOPS_PER_ITERATION + 1024


@tf.autograph.experimental.do_not_convert
def _gif_frames(image_bytes, max_frames) -> tf.Tensor:
  """int64: the frames of a GIF (image_formats.gif_frames in graph ops), counted to max_frames + 1.

  A loop over the block structure without decompressing anything: each iteration steps over one
  block's header (an extension's label, an image's descriptor and colour table) if it is at one,
  then over up to _GIF_HOPS_PER_ITERATION of the length-prefixed sub-blocks that follow it.
  """
  data = tf.cast(tf.io.decode_raw(image_bytes, tf.uint8), tf.int64)
  size = tf.size(data, out_type=tf.int64)
  # Zeros past the end: no step of an iteration can read beyond them (a hop moves at most 256
  # bytes, a block header 11 + 768), and a 0 ends a chain; the loop stops once past the end.
  data = tf.concat([data, tf.zeros([_GIF_PADDING], tf.int64)], axis=0)

  def at(position):
    return tf.gather(data, position)

  def more(position, frames, in_sub_blocks, done):
    del position, in_sub_blocks
    return tf.logical_and(tf.logical_not(done), frames <= max_frames)

  def step(position, frames, in_sub_blocks, done):
    # At a block: an extension (introducer, label) or an image (descriptor, colour table, LZW
    # code size), each followed by its sub-blocks; anything else (the trailer) ends the walk.
    byte = at(position)
    at_block = tf.logical_not(in_sub_blocks)
    is_extension, is_image = tf.equal(byte, 0x21), tf.equal(byte, 0x2C)
    block_next = tf.where(is_extension, position + 2,
                          position + 11 + _colour_table_bytes(at(position + 9)))
    frames += tf.cast(tf.logical_and(at_block, is_image), tf.int64)
    done = tf.logical_or(done, tf.logical_and(at_block, tf.logical_not(
        tf.logical_or(is_extension, is_image))))
    position = tf.where(at_block, block_next, position)
    in_sub_blocks = tf.logical_not(done)
    # Inside a chain of sub-blocks: skip one (its length byte, its bytes); 0 ends the chain.
    for _ in range(_GIF_HOPS_PER_ITERATION):
      length = at(position)
      position = tf.where(in_sub_blocks, position + length + 1, position)
      in_sub_blocks = tf.logical_and(in_sub_blocks, tf.not_equal(length, 0))
    return position, frames, in_sub_blocks, tf.logical_or(done, position >= size)

  start = 13 + _colour_table_bytes(at(tf.constant(10, tf.int64)))
  _, frames, _, _ = tf.while_loop(
      more, step, (start, tf.constant(0, tf.int64), tf.constant(False), tf.constant(False)))
  return tf.maximum(frames, 1)


@tf.autograph.experimental.do_not_convert
def header_pixels(image_bytes, max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS):
  """(width, height, frames), int64 scalars: what the decoder would allocate, from the header.

  image_formats.decoded_pixels in graph ops, so the training pipeline and the exported serving
  signatures check it without Python: PNG's IHDR, BMP's info header, GIF's logical screen and
  frames (counted up to the first past what `max_pixels` allows), JPEG's start-of-frame
  (tf.image.extract_jpeg_shape, which reads the header only). (0, 0, 1) for other bytes, which
  the decoder refuses itself.
  """
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
  head = tf.strings.substr(image_bytes, 0, _HEADER_BYTES)
  padded = tf.strings.substr(tf.strings.join([head, tf.constant(b"\0" * _HEADER_BYTES)]), 0,
                             _HEADER_BYTES)
  header = tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)
  header = tf.ensure_shape(header, [_HEADER_BYTES])
  zero, one = tf.constant(0, tf.int64), tf.constant(1, tf.int64)

  def signed(value):
    return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

  bmp_core = tf.equal(_header_word(header, 14, 4, "little"), 12)
  bmp_width = tf.where(bmp_core, _header_word(header, 18, 2, "little"),
                       signed(_header_word(header, 18, 4, "little")))
  bmp_height = tf.where(bmp_core, _header_word(header, 20, 2, "little"),
                        signed(_header_word(header, 22, 4, "little")))
  gif_width, gif_height = _header_word(header, 6, 2, "little"), _header_word(header, 8, 2, "little")

  def jpeg():
    shape = tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int64)
    return shape[1], shape[0], one

  def gif():
    screen = tf.maximum(gif_width * gif_height, 1)
    return gif_width, gif_height, _gif_frames(image_bytes, max_pixels // screen)

  def png():
    return _header_word(header, 16, 4, "big"), _header_word(header, 20, 4, "big"), one

  def other():
    return zero, zero, one

  is_png = tf.logical_and(_starts_with(header, b"\x89PNG\r\n\x1a\n"),
                          tf.reduce_all(tf.equal(header[12:16], tf.constant(list(b"IHDR"), tf.int64))))
  return tf.case([(_starts_with(header, b"\xff\xd8\xff"), jpeg),
                  (is_png, png),
                  (_starts_with(header, b"GIF8"), gif),
                  (_starts_with(header, b"BM"), lambda: (bmp_width, bmp_height, one))],
                 default=other, exclusive=True)


def check_pixel_limit(image_bytes, max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS):
  """image_bytes, once its header proves it decodes into at most `max_pixels` pixels.

  Otherwise InvalidArgumentError - at once when eager, when the graph runs otherwise - whose
  first line says "image of W x H pixels ... is over the limit of N pixels"; the decode that
  depends on the returned tensor never starts. Eagerly the header is read by image_formats
  (the same rules; a Python loop is much faster than an eager tf.while_loop).
  """
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
  if tf.executing_eagerly():
    problem = image_formats.pixel_limit_problem(image_bytes.numpy(), max_pixels)
    if problem:
      raise tf.errors.InvalidArgumentError(None, None, problem)
    return image_bytes
  width, height, frames = header_pixels(image_bytes, max_pixels)
  # A GIF's frames are counted up to the first one past the limit, so over it: "at least".
  at_least = tf.where(width * height * frames > max_pixels, "at least ", "")
  frames_note = tf.where(frames > 1, tf.strings.join([" x ", at_least, tf.strings.as_string(frames),
                                                      " GIF frames"]), "")
  message = tf.strings.join(image_formats.pixel_limit_message(
      tf.strings.as_string(width), tf.strings.as_string(height), frames_note, max_pixels))
  check = tf.debugging.Assert(width * height * frames <= max_pixels, [message])
  with tf.control_dependencies([check]):
    return tf.identity(image_bytes)


def to_rgb(image) -> tf.Tensor:
  """Any [h, w, 1|3|4] image -> [h, w, 3], same dtype and size (gray repeated, alpha dropped)."""
  image = tf.convert_to_tensor(image)
  channels = image.shape[-1]
  if channels == 1:
    image = tf.image.grayscale_to_rgb(image)
  elif channels == 4:
    image = image[..., :3]
  elif channels is not None and channels != 3:
    raise DataError(f"images have {channels} channels; only 1 (gray), 3 (RGB) and 4 (RGBA) work.")
  return image


def resize_image(image, image_size: int) -> tf.Tensor:
  """Any [h, w, 1|3|4] image -> float32 [size, size, 3], the resize every source goes through."""
  # Bilinear, no antialias: what tf.keras' image_dataset_from_directory does too. It never
  # overshoots, so values stay in 0..255.
  image = tf.image.resize(to_rgb(image), [image_size, image_size])
  image = tf.ensure_shape(image, [image_size, image_size, 3])
  return tf.cast(image, tf.float32)


def preprocess_for_model(images) -> tf.Tensor:
  """Float RGB 0..255 -> what Keras' ResNet50 expects (caffe mode: BGR, ImageNet mean removed).

  images: [h, w, 3] or a batch [b, h, w, 3]. The same arithmetic as
  keras.applications.resnet50.preprocess_input, bit for bit (tested), so ImageNet weights see
  exactly the input they were trained on. The channel flip is a 1x1 convolution with a
  permutation kernel, and the mean its bias: products by 0 and 1 and sums with zeros are exact
  in float32, so the values are those of flip-then-subtract. Why not tf.reverse (or Keras'
  strided slice, 3x slower still): over a last axis of 3 it was the slowest op of the input
  pipeline - per 224-px image 0.25 ms in a batch of 32 and 0.70 ms alone, against 0.09 ms and
  0.41 ms as a convolution (Zen 4, measured). Pinned to the CPU: a GPU would run the
  convolution in TF32 (TensorFlow's default on Ampere and later), which rounds fractional pixels.
  """
  images = tf.cast(images, tf.float32)
  one_image = images.shape.rank == 3
  with tf.device("/cpu:0"):
    batch = images[tf.newaxis] if one_image else images
    preprocessed = tf.nn.bias_add(
        tf.nn.conv2d(batch, tf.constant(_RGB_TO_BGR_KERNEL, tf.float32), strides=1,
                     padding="VALID"),
        -tf.constant(IMAGENET_MEAN_BGR, tf.float32))
  return preprocessed[0] if one_image else preprocessed


def augment_image(image, seed, image_size: int) -> tf.Tensor:
  """Random resized crop plus random left-right flip, both stateless.

  image: [h, w, 1|3|4] of any size and dtype, ideally straight from the decoder: the crop is
  sampled from it and resized to [size, size] in one interpolation. (Resizing to [size, size]
  first and cropping that would interpolate twice, blur twice, and cost more time.)
  Stateless ops make the augmentation a pure function of (image, seed): it does not depend on how
  many map calls run in parallel, and a replayed pipeline augments every element the same way.
  seed: int32/int64 [2]. Returns float32 [size, size, 3] in the input's value range.
  """
  seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
  seeds = tf.random.experimental.stateless_split(seed, num=2)
  image = to_rgb(image)
  # An empty box list plus use_image_if_no_bounding_boxes: sample crops of the whole image.
  crop_begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seeds[1],
      min_object_covered=CROP_AREA_RANGE[0], aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
      area_range=CROP_AREA_RANGE, use_image_if_no_bounding_boxes=True)
  # Slice (a view of whole pixels, any dtype) then the same bilinear resize as resize_image: 1.3x
  # faster than crop_and_resize, whose per-pixel sampling is the costliest op of the map.
  image = tf.image.resize(tf.slice(image, crop_begin, crop_size), [image_size, image_size])
  # Flip after the crop: the same distribution as before it, on image_size² pixels only.
  image = tf.image.stateless_random_flip_left_right(image, seed=seeds[0])
  return tf.ensure_shape(tf.cast(image, tf.float32), [image_size, image_size, 3])



def decode_and_preprocess(image_bytes, image_size: int,
                          max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS) -> tf.Tensor:
  """The eval/serving path for one encoded image: pixel limit -> decode -> resize -> preprocess."""
  return preprocess_for_model(decode_image(image_bytes, image_size, max_pixels))
