"""VMamba (visual state-space model with 2-D selective scan, SS2D) as MambaPEFT fine-tunes it.

    modeling.py   the model: patch embedding, stages of VSS blocks with SS2D's four scan directions, classifier
    loading.py    the released .pth checkpoints (read safely; GitHub release assets) and our own folder format
"""

from __future__ import annotations

import os
from pathlib import Path

from ..files import PICKLE_SUFFIXES, config_format
from ..registry import EXACT, FILES, register_family
from ..summary import count_unique
from ..vim import VisionFamily
from .loading import BUILTIN, RELEASED_FILES, load_vmamba, read_vmamba_pickle, read_vmamba_shapes, save_vmamba
from .modeling import FORMAT, SS2D, VMAMBA_ARCHITECTURES, VMamba, VMambaConfig, build_vmamba, vmamba_config

VMAMBA_KEY = "layers.0.blocks.0.op.A_logs"      # a key only a VMamba state dict has


@register_family
class VMambaFamily(VisionFamily):
    name = "vmamba"
    title = "VMamba"
    model_class = VMamba
    config_class = VMambaConfig
    architectures = VMAMBA_ARCHITECTURES
    builtins = BUILTIN
    check_architecture = "vmamba-micro"

    def config(self, name: str, **overrides):
        return vmamba_config(name, **overrides)

    def claim(self, name_or_path) -> int:
        key = str(name_or_path).lower()
        if self.owns_name(key) or key in RELEASED_FILES or key.startswith("vssm"):
            return EXACT
        path = Path(os.fspath(name_or_path)).expanduser()
        if config_format(path) == FORMAT:
            return FILES
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            try:
                state, _ = read_vmamba_pickle(path, mmap=True)       # tensor data stays on disk
            except Exception:
                return 0
            return FILES if VMAMBA_KEY in state else 0
        return 0

    def load(self, name_or_path, **options):
        return load_vmamba(name_or_path, **options)

    def read_shapes(self, name_or_path):
        return read_vmamba_shapes(name_or_path)

    def source(self, name_or_path) -> str:
        return f"VMamba checkpoint, {name_or_path}"

    def save(self, model, folder) -> None:
        save_vmamba(model, folder)

    def summary(self, model) -> dict:
        c = model.config
        return {
            "model_type": "vmamba", "embed_dim": c.embed_dim, "depths": list(c.depths), "dims": c.dims,
            "d_state": c.d_state, "ssm_ratio": c.ssm_ratio, "num_classes": c.num_classes,
            "drop_path_rate": c.drop_path_rate,
            "parameters": {
                "total": count_unique(model.parameters()),
                "without_head": count_unique(model.parameters()) - count_unique(model.classifier.head.parameters()),
                "patch_embed": count_unique(model.patch_embed.parameters()),
                **{f"stage_{i}": count_unique(stage.parameters()) for i, stage in enumerate(model.layers)},
                "classifier_norm": count_unique(model.classifier.norm.parameters()),
                "head": count_unique(model.classifier.head.parameters()),
            },
        }

    def summary_lines(self, summary: dict) -> list[str]:
        return [
            "  " + "   ".join(f"{k} {summary[k]}" for k in ("embed_dim", "depths", "d_state", "ssm_ratio",
                                                          "num_classes", "drop_path_rate")),
            *(f"  {key:<16} {value:,}" for key, value in summary["parameters"].items()),
        ]


__all__ = ["VMAMBA_ARCHITECTURES", "SS2D", "VMamba", "VMambaConfig", "build_vmamba", "vmamba_config", "load_vmamba",
           "save_vmamba", "VMambaFamily"]
