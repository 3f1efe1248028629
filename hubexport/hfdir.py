"""The non-weight files of a Hugging Face folder: config, generation config, tokenizer and processor files."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from hubexport.errors import ConfigError

if TYPE_CHECKING:  # transformers takes ~1.5 s to import: the support files are copied without it
    from transformers import PretrainedConfig

# What save_pretrained of a model, tokenizer and processor writes besides weights and config.json.
SUPPORT_FILES = (
    "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "*.model", "*.tiktoken", "chat_template*", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "*.py",
)


def load_config(hf_dir: Path | None, searched: Path, *, trust_remote_code: bool) -> PretrainedConfig:
    if hf_dir is None:
        raise ConfigError(
            f"no config.json in {searched}/huggingface, {searched}/model/huggingface or {searched}",
            hint="copy the base model's config.json (and tokenizer) into huggingface/ next to the rank files",
        )
    import transformers
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    except StrictDataclassError as e:  # transformers' own checks of the values (e.g. one layer type per layer)
        raise ConfigError(f"{hf_dir / 'config.json'} is not a valid config: {str(e).splitlines()[-1].strip()[:160]}",
                          hint="make its values agree, or re-copy config.json from the base model") from None
    except ValueError as e:
        msg = str(e).splitlines()[0]
        hint = ("the config needs custom code: pass --trust-remote-code" if "trust_remote_code" in msg
                else f"is transformers {transformers.__version__} too old for this model type?")
        raise ConfigError(f"{hf_dir / 'config.json'} cannot be loaded: {msg[:160]}", hint=hint) from None
    except OSError as e:
        raise ConfigError(f"{hf_dir / 'config.json'} cannot be read: {str(e).splitlines()[0][:160]}",
                          hint="re-copy config.json from the base model") from None


def support_files(hf_dir: Path) -> list[Path]:
    return sorted(p for p in hf_dir.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, g) for g in SUPPORT_FILES))


def copy_support_files(hf_dir: Path, dst: Path) -> list[str]:
    names = []
    for p in support_files(hf_dir):
        shutil.copy2(p, dst / p.name)
        names.append(p.name)
    return names
