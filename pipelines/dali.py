"""The DALI backend: readers.webdataset + one decode + two composed-warp views, on the GPU when present.

Same graph on the CPU with `device_id=None` (correctness only); no Python callbacks. One reader per
rank reads the rank's range of each split, pipelines.mixing's rule (which is DALI's own sharding).
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import torch

from pipelines.augment import AugmentSpec
from pipelines.config import DataConfig
from pipelines.errors import PipelineError
from pipelines.loaders import LoaderRequest, TrainLoader, ValLoader
from pipelines.mixing import batches_per_epoch, compose_batch, reads_whole_split, sample_range, seed_for
from pipelines.reading import TAR_BLOCK, Split, check_header, shard_index
from pipelines.torch_loader import jpeg_size
from shard_tools import storage
from shard_tools.format import DEFAULT_MAX_PIXELS, IMAGE_EXT, LABEL_EXT, ShardFormatError, index_name

_JPEG_HEAD = 2048  # bytes of each JPEG read for its frame header (the pixel cap); a later header is not checked


def check_jpeg_members(split: Split, samples: range | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Check every image of `samples` (default: the whole split) starts with a JPEG SOI marker and ends with
    EOI: two small spans per image, read with one call per shard (in object storage: one ranged GET).

    DALI 2.4's CPU decoder crashes the process (SIGSEGV) on an undecodable image, so the DALI backend
    refuses damaged shards up front, for the samples each reader will read. Damage inside a
    well-formed JPEG is not caught here; `mt-shard verify` (sha256) catches any change after packing.
    An image whose frame header (within its first 2 KiB) claims more than `max_pixels` pixels is
    refused too: DALI cannot skip it. Returns the number of images checked.
    """
    checked = 0
    for number, first, stop in split.pieces(range(split.total) if samples is None else samples):
        shard = split.shards[number]
        index = shard_index(split, number)
        ranges = []
        for offset, size, _ in index.table[first:stop].tolist():
            # the member's tar header and the JPEG's first bytes in one span: the header must match the index
            ranges += [(offset - TAR_BLOCK, TAR_BLOCK + min(size, _JPEG_HEAD)),
                       (offset + max(size - 32, 0), min(size, 32))]
        try:
            spans = storage.read_ranges(shard, ranges)
        except OSError as exc:
            raise PipelineError(f"{shard}: unreadable ({exc}); check the set with `mt-shard verify`") from None
        except ShardFormatError as exc:  # object storage, after its retries
            raise PipelineError(str(exc)) from None
        for row, key in enumerate(index.keys[first:stop]):
            check_header(shard, spans[2 * row], TAR_BLOCK, key, IMAGE_EXT, int(index.table[first + row, 1]))
            if spans[2 * row][TAR_BLOCK:TAR_BLOCK + 3] != b"\xff\xd8\xff" or b"\xff\xd9" not in spans[2 * row + 1]:
                raise PipelineError(
                    f"{shard}: member {key}.{IMAGE_EXT} is not a complete JPEG; re-pack this shard (check the set "
                    "with `mt-shard verify`) or use backend=torch, which skips undecodable images")
            size = jpeg_size(spans[2 * row][TAR_BLOCK:])
            if size is not None and size[0] * size[1] > max_pixels:
                raise PipelineError(
                    f"{shard}: member {key}.{IMAGE_EXT} claims {size[0]}x{size[1]} pixels, over data.max_pixels="
                    f"{max_pixels}; re-pack the set (mt-shard pack --max-pixels) or use backend=torch, which skips it")
        checked += stop - first
    return checked


def _endpoint_key(endpoint: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(endpoint.strip())
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")


def _shown_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")  # never user:password@


def check_dali_endpoint(url: str) -> None:
    """Refuse (one line) a setup where DALI would read `url` from another store than boto3 does.

    DALI 2.4 takes a custom endpoint only from AWS_ENDPOINT_URL; AWS_ENDPOINT_URL_S3 and a profile's
    endpoint_url reach boto3 (our manifest and index reads) but not DALI, which would then ask AWS
    itself and report a misleading "object not found". Setting AWS_ENDPOINT_URL for the user is not
    safe: it would also redirect every other AWS service (STS for role profiles) to the store.
    """
    from shard_tools import s3

    try:
        resolved = str(s3.client().meta.endpoint_url)  # type: ignore[attr-defined]
    except ShardFormatError as exc:
        raise PipelineError(str(exc)) from None
    dali_endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    if dali_endpoint:
        if _endpoint_key(dali_endpoint) == _endpoint_key(resolved):
            return
        seen = f"AWS_ENDPOINT_URL is {_shown_endpoint(dali_endpoint)}"
    else:
        host = _endpoint_key(resolved)[1]
        if host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
            return  # AWS S3 itself: DALI's client finds it by region
        seen = "AWS_ENDPOINT_URL is not set"
    raise PipelineError(
        f"{url}: the set is at {_shown_endpoint(resolved)} (from AWS_ENDPOINT_URL_S3 or the profile's endpoint_url) "
        f"but DALI reads the endpoint only from AWS_ENDPOINT_URL, and {seen}; set "
        f"AWS_ENDPOINT_URL={_shown_endpoint(resolved)}, or use data.backend=torch"
    )


def _scalar_xy(x, y):
    from nvidia.dali import fn

    return fn.stack(x, y)


def _round_half_even(x):
    # Python's round() on k/2 values, as torchvision's CenterCrop uses it
    from nvidia.dali import math as dmath

    floor = dmath.floor(x)
    odd = floor - 2.0 * dmath.floor(floor * 0.5)
    return floor + 2.0 * (x - floor) * odd


def view_graph(image, shape, spec: AugmentSpec, gpu: bool):
    """One augmented view (uint8 CHW) of decoded `image` (HWC) whose encoded shape (H, W, C) is `shape`."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    out_h, out_w = spec.output_size
    height = fn.cast(shape[0], dtype=types.FLOAT)
    width = fn.cast(shape[1], dtype=types.FLOAT)
    matrix = None
    if spec.rotation_degrees:
        angle = fn.random.uniform(range=[-spec.rotation_degrees, spec.rotation_degrees])
        matrix = fn.transforms.rotation(angle=angle, center=_scalar_xy(width * 0.5, height * 0.5))
    if spec.crop_scale is not None:
        anchor, size = fn.random_crop_generator(shape, random_area=list(spec.crop_scale),
                                                random_aspect_ratio=list(spec.crop_ratio), num_attempts=10)
        anchor, size = fn.cast(anchor, dtype=types.FLOAT), fn.cast(size, dtype=types.FLOAT)
        x0, y0, box_w, box_h = anchor[1], anchor[0], size[1], size[0]
    elif spec.eval_resize is not None:
        short = dmath.min(width, height)
        resized_w = dmath.floor(spec.eval_resize * width / short)
        resized_h = dmath.floor(spec.eval_resize * height / short)
        sx, sy = width / resized_w, height / resized_h
        x0 = _round_half_even((resized_w - out_w) * 0.5) * sx
        y0 = _round_half_even((resized_h - out_h) * 0.5) * sy
        box_w, box_h = out_w * sx, out_h * sy
    else:
        x0, y0, box_w, box_h = width * 0.0, height * 0.0, width, height
    crop_args = dict(from_start=_scalar_xy(x0, y0), from_end=_scalar_xy(x0 + box_w, y0 + box_h),
                     to_start=[0.0, 0.0], to_end=[float(out_w), float(out_h)])
    matrix = fn.transforms.crop(matrix, **crop_args) if matrix is not None else fn.transforms.crop(**crop_args)
    if spec.hflip:
        flip_x = 1.0 - 2.0 * fn.cast(fn.random.coin_flip(), dtype=types.FLOAT)
        matrix = fn.transforms.scale(matrix, scale=_scalar_xy(flip_x, flip_x * 0.0 + 1.0),
                                     center=[out_w / 2.0, out_h / 2.0])
    if spec.translate_px:
        values = [float(v) for v in range(-spec.translate_px, spec.translate_px + 1)]
        matrix = fn.transforms.translation(matrix, offset=fn.random.uniform(values=values, shape=[2]))
    fill = None if spec.reflect_pad else 0.0
    view = fn.warp_affine(image, matrix=matrix, size=[out_h, out_w], inverse_map=False, fill_value=fill,
                          interp_type=types.INTERP_LINEAR)
    if spec.has_colour:
        def factor(v):
            return fn.random.uniform(range=[max(0.0, 1.0 - v), 1.0 + v]) if v else 1.0

        brightness, contrast = factor(spec.brightness), factor(spec.contrast)
        saturation = factor(spec.saturation)
        hue = fn.random.uniform(range=[-spec.hue * 360.0, spec.hue * 360.0]) if spec.hue else 0.0
        grey = fn.reductions.mean(fn.color_space_conversion(view, image_type=types.RGB, output_type=types.GRAY))
        gain, offset = brightness * contrast, brightness * (1.0 - contrast)
        if gpu and not isinstance(gain, float):
            gain = gain.gpu()
        if gpu and not isinstance(offset, float):
            offset = offset.gpu()
        # brightness then contrast about the view's mean grey, one float expression; hsv clamps to uint8
        view = fn.hsv(view * gain + offset * grey, hue=hue, saturation=saturation, dtype=types.UINT8)
    if spec.noise_std:
        view = fn.noise.gaussian(view, stddev=spec.noise_std * 255.0)
    return fn.transpose(view, perm=[2, 0, 1])


pipelines_built = False  # set once this process has built a DALI pipeline


def build_pipeline(shards: list[str], specs: tuple[AugmentSpec, ...], batch_size: int, *, shard_id: int,
                   num_shards: int, shuffle_buffer: int, seed: int, threads: int, device_id: int | None,
                   checkpoint: bytes | None = None, with_keys: bool = False,
                   pad_last_batch: bool = False):
    """A DALI pipeline yielding one uint8 CHW output per spec, the int32 label, then (with_keys) the
    readers' source info ("<tar>:<offset>:<member>") as bytes."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=max(threads, 1), device_id=device_id, seed=seed,
                  enable_checkpointing=True, prefetch_queue_depth=2)
    def graph():
        jpegs, labels = fn.readers.webdataset(
            paths=shards, index_paths=[index_name(s) for s in shards], ext=[IMAGE_EXT, LABEL_EXT],
            dtypes=[types.UINT8, types.INT32], missing_component_behavior="error",
            shard_id=shard_id, num_shards=num_shards, stick_to_shard=True, pad_last_batch=pad_last_batch,
            random_shuffle=shuffle_buffer > 0, initial_fill=max(shuffle_buffer, 1), name="reader")
        image = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                  adjust_orientation=False)
        # shape metadata is on the CPU even for GPU images; peek_image_shape crashed DALI 2.4 on corrupt input
        shape = image.shape()
        keys = (fn.get_property(jpegs, key="source_info"),) if with_keys else ()
        return (*[view_graph(image, shape, spec, gpu) for spec in specs], labels, *keys)

    global pipelines_built
    pipelines_built = True  # DALI's native threads live here now: no plain fork (pipelines.workers)
    pipe = graph(checkpoint=checkpoint) if checkpoint is not None else graph()
    try:
        pipe.build()
    except RuntimeError as exc:
        raise PipelineError(f"DALI could not build the pipeline over {shards[0]} ...: {exc}") from None
    return pipe


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """Copy one DALI output into a new torch tensor: GPU outputs onto `device`, CPU ones (labels) on the CPU."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    if not isinstance(tensor_list, TensorListGPU):
        device = torch.device("cpu")
    dali_tensor = tensor_list.as_tensor()
    out = torch.empty(dali_tensor.shape(), dtype=to_torch_type[dali_tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dali_tensor, out, cuda_stream=stream)
    return out


def _run(pipe, shards: list[str]):
    try:
        return pipe.run()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        fix = ("check that the store is up and AWS_ENDPOINT_URL points at it, and the set with `mt-shard verify`"
               if storage.is_remote(shards[0]) else "check the set with `mt-shard verify` and re-pack damaged shards")
        raise PipelineError(f"DALI failed reading {len(shards)} shard(s) starting {shards[0]}: {first}; {fix}") from None


class _DaliStream:
    """One split's pipeline for this rank (train: a continuous shuffled stream; val: padded whole passes)."""

    def __init__(self, split: Split, specs, batch, cfg: DataConfig, rank, world_size, share, tag, device_id,
                 shuffle: bool = True, with_keys: bool = False):
        self.shards = list(split.shards)
        # a reader's share that would not fill one batch: every rank reads the whole split (mixing's rule)
        self.sharded = not (share and reads_whole_split(split.total, world_size, batch))
        self.shard_id, self.num_shards = (rank, world_size) if self.sharded else (0, 1)
        self.samples = len(sample_range(split.total, self.shard_id, self.num_shards))
        self.specs, self.batch, self.cfg = specs, batch, cfg
        self.seed, self.device_id = seed_for(cfg.seed, rank, tag), device_id
        self.shuffle_buffer = cfg.shuffle_buffer if shuffle else 0
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self.names = ("student", "teacher") if len(specs) == 2 else ("image",)
        self.with_keys = with_keys
        self.pad_last_batch = not shuffle  # val: whole passes, padding rows marked invalid
        self.pipe = None

    def open(self, checkpoint: bytes | None = None):
        self.pipe = build_pipeline(self.shards, self.specs, self.batch, shard_id=self.shard_id,
                                   num_shards=self.num_shards, shuffle_buffer=self.shuffle_buffer,
                                   seed=self.seed, threads=self.cfg.workers, device_id=self.device_id,
                                   checkpoint=checkpoint, with_keys=self.with_keys,
                                   pad_last_batch=self.pad_last_batch)

    def next(self) -> dict[str, torch.Tensor]:
        if self.pipe is None:
            self.open()
        outputs = list(_run(self.pipe, self.shards))
        keys = None
        if self.with_keys:
            info = outputs.pop()
            keys = [bytes(info.at(i)).decode().rsplit(":", 1)[-1].split(".")[0] for i in range(len(info))]
        tensors = [_to_torch(o, self.device) for o in outputs]
        batch = {"label": tensors[-1].reshape(-1).to(torch.int64)}
        for name, tensor in zip(self.names, tensors[:-1], strict=True):
            batch[name] = tensor
        if keys is not None:
            batch["key"] = keys
        return batch

    @property
    def batches_per_pass(self) -> int:
        return max(math.ceil(self.samples / self.batch), 1)

    def checkpoint(self) -> str:
        return base64.b64encode(self.pipe.checkpoint()).decode("ascii") if self.pipe is not None else ""


def build_dali_loaders(request: LoaderRequest) -> tuple[TrainLoader, ValLoader]:
    """The DALI backend behind pipelines.loaders' contract; device_id None = CPU-only graph.

    Differences from the torch backend, by design: random draws come from DALI's generators (same
    distributions); reflect padding repeats the border pixel (warp_affine has no reflection); an
    undecodable image is refused up front (DALI 2.4's CPU decoder crashes on one) instead of skipped.
    """
    cfg, rank, world_size, with_keys = request.cfg, request.rank, request.world_size, request.with_keys
    device_id = request.device_id
    if device_id is None and torch.cuda.is_available():
        device_id = torch.cuda.current_device()
    labeled_rows, unlabeled_rows = cfg.labeled_per_batch, cfg.unlabeled_per_batch
    if storage.is_remote(request.labeled.shards[0]):
        check_dali_endpoint(request.labeled.shards[0])  # DALI reads the s3:// shards and indexes itself
    views = (request.student, request.teacher)
    lab = _DaliStream(request.labeled, views, labeled_rows, cfg, rank, world_size, unlabeled_rows > 0,
                      "labeled", device_id, with_keys=with_keys)
    unl = (_DaliStream(request.unlabeled, views, unlabeled_rows, cfg, rank, world_size, False,
                       "unlabeled", device_id, with_keys=with_keys) if unlabeled_rows else None)
    epoch_split, rows = (request.unlabeled, unlabeled_rows) if unl else (request.labeled, labeled_rows)
    train = DaliTrainLoader(lab, unl, batches_per_epoch(epoch_split.total, world_size, 1, rows), world_size)

    eval_spec = request.eval_spec
    val_stream = _DaliStream(request.val, (eval_spec,), cfg.eval_batch_size, cfg, rank, world_size, False, "val",
                             device_id, shuffle=False, with_keys=with_keys)
    val_batches = max(math.ceil(len(sample_range(request.val.total, r, world_size)) / cfg.eval_batch_size)
                      for r in range(world_size))
    for stream, split in ((lab, request.labeled), (unl, request.unlabeled), (val_stream, request.val)):
        if stream is not None:  # the samples this rank's readers will read, before DALI decodes one
            check_jpeg_members(split, sample_range(split.total, stream.shard_id, stream.num_shards), cfg.max_pixels)

    def val_pass() -> Iterator[dict]:
        remaining = val_stream.samples
        for _ in range(val_stream.batches_per_pass if remaining else 0):
            batch = val_stream.next()
            valid = torch.arange(cfg.eval_batch_size, device=batch["label"].device) < remaining
            remaining -= int(valid.sum())
            batch["label"] = torch.where(valid, batch["label"], torch.full_like(batch["label"], -1))
            batch["valid"] = valid
            if with_keys:
                batch["key"] = batch["key"][:int(valid.sum())]
            yield batch

    def empty_val() -> dict:
        device = val_stream.device
        return {"image": torch.zeros((cfg.eval_batch_size, 3, *eval_spec.output_size), dtype=torch.uint8, device=device),
                "label": torch.full((cfg.eval_batch_size,), -1, dtype=torch.int64),
                "valid": torch.zeros(cfg.eval_batch_size, dtype=torch.bool)}

    return train, ValLoader(val_pass, val_batches, empty_val)


class DaliTrainLoader(TrainLoader):
    """TrainLoader over each reader's continuous shuffled stream; an epoch is its next len(self) batches.

    DALI's shuffle buffer spans pass boundaries, so a few samples can repeat across an epoch edge while
    others wait for the next one. The position is DALI's own pipeline checkpoints (exact resume).
    """

    def __init__(self, labeled: _DaliStream, unlabeled: _DaliStream | None, length: int, world_size: int) -> None:
        super().__init__(self._open_epoch_dali, lambda epoch: [length], length, world_size, 1)
        self.labeled, self.unlabeled = labeled, unlabeled

    def _open_epoch_dali(self, epoch: int, starts: list[list[int]]) -> Iterator[dict]:
        for index in range(starts[0][0], len(self)):
            labeled = self.labeled.next()
            unlabeled = self.unlabeled.next() if self.unlabeled is not None else None
            batch = compose_batch(labeled, unlabeled)
            batch.update(_worker=0, _index=index, _skipped=0)
            yield batch

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["dali"] = {"labeled": self.labeled.checkpoint()}
        if self.unlabeled is not None:
            state["dali"]["unlabeled"] = self.unlabeled.checkpoint()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state.get("dali", {})
        for name, stream in (("labeled", self.labeled), ("unlabeled", self.unlabeled)):
            if stream is not None and saved.get(name):
                stream.open(base64.b64decode(saved[name]))
