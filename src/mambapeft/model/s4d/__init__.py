"""Deep S4D (diagonal S4), the model of the SDT paper's S4 study: stacked layers ("theory") or an encoder,
residual layers, mean pool and decoder ("classifier").

    modeling.py   the S4D layer (kernel and recurrence forms) and the deep model
    loading.py    our folder format; "tiny-s4d", built in
"""

from __future__ import annotations

from ..files import config_format
from ..registry import FILES, ClassifierFamily, register_family
from .loading import BUILTIN, FORMAT, load_s4d, looks_like_s4d, read_s4d_shapes, save_s4d
from .modeling import (
    S4D_ARCHITECTURES,
    DeepS4D,
    S4DConfig,
    S4DLayer,
    build_s4d,
    fft_conv,
    s4d_config,
    s4d_kernel,
    s4d_recurrence,
)


@register_family
class S4DFamily(ClassifierFamily):
    name = "s4d"
    title = "S4D"
    model_class = DeepS4D
    config_class = S4DConfig
    architectures = S4D_ARCHITECTURES
    builtins = BUILTIN
    tasks = ("sequence",)
    check_architecture = "s4d-micro"

    def config(self, name: str, **overrides):
        return s4d_config(name, **overrides)

    def claim(self, name_or_path) -> int:
        if self.owns_name(name_or_path):
            return super().claim(name_or_path)
        return FILES if config_format(name_or_path) == FORMAT else 0

    def load(self, name_or_path, **options):
        return load_s4d(name_or_path, **options)

    def read_shapes(self, name_or_path):
        return read_s4d_shapes(name_or_path)

    def source(self, name_or_path) -> str:
        return f"S4D checkpoint, {name_or_path}"

    def save(self, model, folder) -> None:
        save_s4d(model, folder)

    def summary(self, model) -> dict:
        return model.summary()

    def summary_lines(self, summary: dict) -> list[str]:
        return [
            "  " + "   ".join(f"{k} {summary[k]}" for k in ("form", "d_model", "n_layers", "d_state", "l_max",
                                                          "A_init")),
            *(f"  {key:<12} {value:,}" for key, value in summary["parameters"].items()),
        ]


__all__ = ["S4D_ARCHITECTURES", "DeepS4D", "S4DConfig", "S4DLayer", "build_s4d", "s4d_config", "fft_conv",
           "s4d_kernel", "s4d_recurrence", "load_s4d", "save_s4d", "read_s4d_shapes", "looks_like_s4d", "S4DFamily"]
