# Copyright 2026 The transformers-mhc contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""`save_pretrained` / `push_to_hub` of the models of this folder: a complete `auto_map` and the package's card.

transformers' `save_pretrained` maps only the class being saved in `config.json` (`AutoModelForCausalLM` for
a causal LM, plus `AutoConfig`), so a checkpoint saved from `MHCForCausalLM` cannot be opened with
`AutoModel.from_pretrained(..., trust_remote_code=True)`; and `push_to_hub` uploads transformers' placeholder
card. `HubMixin`, placed before `PreTrainedModel` in the bases of each `*PreTrainedModel`, fixes both:

- before saving, `config.auto_map` gets the whole family of the code file (config, base model, causal LM);
  transformers' `custom_object_save` keeps these entries and copies the code files as usual;
- `save_pretrained` also writes the package's model card as `README.md` when the folder has none;
- `push_to_hub` uploads through `transformers_mhc.hub` (the path `transformers-mhc push` takes), with the
  package's card where the repository has none yet; `save_pretrained(..., push_to_hub=True)` uploads the
  saved folder with its README.md.

This file travels with checkpoints as remote code, so it needs nothing beyond transformers, and the package
is imported inside `try:`. Where the package is not installed (a checkpoint loaded with `trust_remote_code`),
the `auto_map` is still complete; the card and the upload are transformers' own.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from transformers import PreTrainedModel

# The Auto class of each model class of a code file, by the end of its name (transformers' naming).
AUTO_CLASS_BY_SUFFIX: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("Model", "AutoModel"),
)


def _qualified_name(cls: type) -> str:
    """`file_stem.ClassName`, the form `auto_map` uses for code saved next to `config.json`."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def family_auto_map(model_class: type[PreTrainedModel]) -> dict[str, str]:
    """The `auto_map` of a model family: its config class and every model class defined in the same code file.

    For `MHCForCausalLM`: `{"AutoConfig": "configuration_mhc.MHCConfig", "AutoModel": "modeling_mhc.MHCModel",
    "AutoModelForCausalLM": "modeling_mhc.MHCForCausalLM"}`. The classes are found in the code file itself, not
    in the Auto registries, so this also holds for classes loaded as remote code, where only the class that
    was loaded is registered.
    """
    config_class = model_class.config_class
    auto_map = {"AutoConfig": _qualified_name(config_class)}
    module = sys.modules[model_class.__module__]
    for obj in vars(module).values():
        if not (
            isinstance(obj, type)
            and issubclass(obj, PreTrainedModel)
            and obj.__module__ == module.__name__
            and obj.config_class is config_class
            and not obj.__name__.endswith("PreTrainedModel")  # the abstract base of the family
        ):
            continue
        for suffix, auto_class in AUTO_CLASS_BY_SUFFIX:
            if obj.__name__.endswith(suffix):
                auto_map[auto_class] = _qualified_name(obj)
                break
    return auto_map


def _package_hub() -> Any | None:
    """`transformers_mhc.hub` when the package is installed, else None (remote code on its own)."""
    try:
        from transformers_mhc import hub
    except ImportError:
        return None
    return hub


class HubMixin:
    """Complete `auto_map`, the package's model card and its upload path for `save_pretrained` / `push_to_hub`.

    Goes before `PreTrainedModel` in the bases: `class MHCPreTrainedModel(HubMixin, PreTrainedModel)`.
    """

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        *args: Any,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """`PreTrainedModel.save_pretrained`, with the family's `auto_map` and, if absent, the model card.

        `push_to_hub=True` uploads the folder afterwards with the package's card (its README.md), like
        `push_to_hub`; `repo_id` (default: the folder name), `commit_message`, `private`, `token` and `create_pr`
        are taken from the keyword arguments as transformers does. Without the package, it is transformers' own.
        """
        hub = _package_hub()
        # Like `custom_object_save`: code defined in `__main__` is not saved, so nothing to map.
        if self.is_remote_code() and type(self).__module__ != "__main__":
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                **family_auto_map(type(self)),
            }
        if push_to_hub and hub is None:
            return super().save_pretrained(save_directory, is_main_process, *args, push_to_hub=True, **kwargs)
        upload = {
            key: kwargs.pop(key)
            for key in ("repo_id", "commit_message", "private", "create_pr")
            if push_to_hub and key in kwargs
        }
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if hub is None or not is_main_process:
            return None
        has_card = os.path.exists(os.path.join(save_directory, hub.README_NAME))
        if not has_card and self.config.model_type in hub.SUPPORTED_MODEL_TYPES:
            hub.write_model_card(save_directory, hub.build_model_card(self))
        if push_to_hub:
            repo_id = upload.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            hub.push_folder(save_directory, repo_id, token=kwargs.get("token"), **upload)
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> Any:
        """`PreTrainedModel.push_to_hub`, with the package's model card where the repository has none.

        Same arguments and return value (`CommitInfo`) as transformers'. As transformers does, a README.md the
        repository already has is kept (with `tags` and the model's tags added); otherwise the card built from
        this model is uploaded, with `repo_id` in its loading snippet, instead of transformers' placeholder.
        Without the package installed, this is transformers' own method (complete `auto_map`, its card).
        """
        hub = _package_hub()
        if hub is None:
            return super().push_to_hub(
                repo_id,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                max_shard_size=max_shard_size,
                tags=tags,
            )
        return hub.push_to_hub(
            self,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            max_shard_size=max_shard_size,
            tags=[*(self.model_tags or []), *(tags or [])],
            keep_repo_card=True,
        )


__all__ = ["AUTO_CLASS_BY_SUFFIX", "HubMixin", "family_auto_map"]
