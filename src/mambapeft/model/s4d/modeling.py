"""S4D (the diagonal S4 of Gu et al. 2022) and the deep S4D models of the SDT paper's S4 experiments.

The layer, as the SDT authors' code builds it (furiosa-ai/ssm-peft, S4/load_models/load_s4.py), with shapes
batch b, length L, channels H, states N per channel:

    dt = exp(log_dt)                                   (H,)
    A  = -exp(log_A_real) + i * A_imag                 (H, N) complex, diagonal
    C                                                  (H, N) complex, stored as real pairs (H, N, 2)
    K[h, l] = 2 Re sum_n C[h, n] (exp(dt A) - 1) / A * exp(dt A l)        the Vandermonde kernel (H, L)
    y = K * u (causal convolution over time, by FFT) + D u                 u, y (b, L, H); D (H,)
    out = relu(output_linear(y))                       output_linear: H -> H with bias

B is folded into C (B = 1), as in S4D. The convolution is the unrolled form of the discretised recurrence
(zero-order hold)

    h_l = exp(dt A) h_{l-1} + (exp(dt A) - 1) / A * u_l,    y_l = 2 Re(C h_l) + D u_l

which `s4d_recurrence` computes step by step in float64: the tests' oracle for the FFT path.

Two models (`DeepS4D`), the two forms the paper uses:

    form "theory"      (the synthetic teacher-student task): inputs (b, L, H) -> layer -> layer -> ... -> (b, L, H);
                       no encoder, no residual, no norm; every layer ends in its ReLU
    form "classifier"  (pixel sequences): inputs (b, L, d_input) --encoder (Linear)--> (b, L, H)
                       each layer: h = h + dropout(layer(h))        (channel dropout, as Dropout1d on (b, H, L))
                       mean over L --> decoder (Linear) --> logits (b, classes)
                       (the official code also builds LayerNorms here but never calls them; we build none)

PEFT interface (model/interface.py): each `S4DLayer` is a mixer. Its only projection is the output linear (role
"out_proj"); its tensors are "C", "log_A_real", "A_imag", "log_dt", "D" and "out_bias" (the output linear's bias),
read as attributes at every call so parametrizations apply. It has no hook stages: no in_proj to insert soft tokens
around and no input-dependent B and C to extend. The input encoder of the classifier is a Linear over pixel values,
not a token table or a patch embedding, so the model declares no embedding (`embedding_path` None): prompt tuning
and embedding LoRA do not apply; `full` trains the encoder like every other weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ...errors import ConfigError
from ..config import FamilyConfig
from ..interface import PeftMixerInterface, PeftModelInterface, Projection, TensorSlot, unwrap

FORMS = ("theory", "classifier")
A_INITS = ("random", "default")


@dataclass
class S4DConfig(FamilyConfig):
    """The sizes of a deep S4D model; everything an adapter depends on, plus its initialisation."""

    title = "S4D"
    positive_ints = ("d_model", "n_layers", "d_state", "d_input", "num_classes", "l_max")

    d_model: int = 64                  # H: channels of every layer
    n_layers: int = 4
    d_state: int = 16                  # N: complex states per channel
    form: str = "theory"               # "theory" (stacked layers) or "classifier" (encoder, residual, pool, decoder)
    d_input: int = 1                   # classifier: features per time step (1 for grey pixels)
    num_classes: int = 10              # classifier: outputs of the decoder
    dropout: float = 0.0               # classifier: channel dropout on each layer's output
    A_init: str = "random"             # "random": log U(0, 1), pi * randint(N); "default": log 0.5, pi * n
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    l_max: int = 200                   # the sequence length the model is built for: its `peft_inputs`, SDT's horizon
    model_type: str = "s4d"

    def validate(self):
        if self.form not in FORMS:
            raise ConfigError(f"S4D config: form={self.form!r}; one of {', '.join(FORMS)}")
        if self.A_init not in A_INITS:
            raise ConfigError(f"S4D config: A_init={self.A_init!r}; one of {', '.join(A_INITS)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"S4D config: dropout={self.dropout} must be in [0, 1)")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"S4D config: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


# Named architectures. "s4d-theory" and "s4d-target" are the synthetic task's frozen model and teacher (run_s4.py:
# H 64, 4 layers with N 16; 1 layer with N 8; A_init random; L 200); "s4d-pixels" the classifier of the pixel study
# (run_s4_real.py's H 64, 4 layers, N 16, A_init default) at the 8x8 digits' length 64; "s4d-micro" a small
# classifier of odd sizes for tests and `mambapeft methods`.
S4D_ARCHITECTURES: dict[str, dict] = {
    "s4d-theory": dict(d_model=64, n_layers=4, d_state=16, form="theory", A_init="random", l_max=200),
    "s4d-target": dict(d_model=64, n_layers=1, d_state=8, form="theory", A_init="random", l_max=200),
    "s4d-pixels": dict(d_model=64, n_layers=4, d_state=16, form="classifier", A_init="default", d_input=1,
                       num_classes=10, l_max=64),
    "s4d-micro": dict(d_model=6, n_layers=2, d_state=5, form="classifier", A_init="default", d_input=3,
                      num_classes=4, l_max=11),
}


def s4d_config(name: str, **overrides) -> S4DConfig:
    """The S4DConfig of a named architecture ("s4d-theory", ...), with any field overridden."""
    return S4DConfig.named(S4D_ARCHITECTURES, name, **overrides)


# ---------------------------------------------------------------------------------------------- the math


def complex_of(pairs: torch.Tensor) -> torch.Tensor:
    """(..., 2) real pairs -> complex (...); any strides (a parametrized C need not be contiguous)."""
    return torch.complex(pairs[..., 0], pairs[..., 1])


def discretise(C: torch.Tensor, log_dt: torch.Tensor, log_A_real: torch.Tensor, A_imag: torch.Tensor):
    """(dtA, C~) of the zero-order hold: dtA = dt A and C~ = C (exp(dt A) - 1) / A, both (H, N) complex.

    C: (H, N, 2) real pairs; log_dt (H,); log_A_real, A_imag (H, N)."""
    A = torch.complex(-torch.exp(log_A_real), A_imag)                    # (H, N)
    dtA = A * torch.exp(log_dt)[:, None]                                 # (H, N)
    return dtA, complex_of(C) * torch.expm1(dtA) / A


def s4d_kernel(C, log_dt, log_A_real, A_imag, length: int) -> torch.Tensor:
    """K (H, L) = 2 Re sum_n C~[h, n] exp(dtA[h, n] l): the Vandermonde product of the authors' S4DKernel.

    Written in real arithmetic, exp(dtA l) = exp(Re(dtA) l) (cos + i sin)(Im(dtA) l): the same numbers as the complex
    product, several times faster on a CPU (complex exp and complex batched products are slow paths there)."""
    dtA, C_tilde = discretise(C, log_dt, log_A_real, A_imag)
    steps = torch.arange(length, device=dtA.device, dtype=log_dt.dtype)
    decay = torch.exp(dtA.real[..., None] * steps)                       # (H, N, L)
    angle = dtA.imag[..., None] * steps                                  # (H, N, L)
    terms = C_tilde.real[..., None] * torch.cos(angle) - C_tilde.imag[..., None] * torch.sin(angle)
    return 2 * (decay * terms).sum(1)                                    # (H, L)


def fft_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Causal convolution over time: y[:, l, h] = sum_{j <= l} kernel[h, l - j] u[:, j, h]. u (b, L, H), kernel (H, L).

    Zero-padded to 2L so the circular FFT convolution is the linear one."""
    length = u.shape[1]
    u_f = torch.fft.rfft(u.mT, n=2 * length)                             # (b, H, L + 1)
    k_f = torch.fft.rfft(kernel, n=2 * length)                           # (H, L + 1)
    return torch.fft.irfft(u_f * k_f, n=2 * length)[..., :length].mT     # (b, L, H)


def s4d_recurrence(u, C, log_dt, log_A_real, A_imag, D) -> torch.Tensor:
    """The plain reference, one step at a time in float64: u (b, L, H) -> y (b, L, H) before the output linear.

    h_l = exp(dt A) h_{l-1} + (exp(dt A) - 1) / A * u_l;   y_l = 2 Re(sum_n C h_l) + D u_l."""
    u, C, log_dt, log_A_real, A_imag, D = (t.double() for t in (u, C, log_dt, log_A_real, A_imag, D))
    A = torch.complex(-torch.exp(log_A_real), A_imag)                    # (H, N)
    dt = torch.exp(log_dt)[:, None]
    decay, gain = torch.exp(dt * A), torch.expm1(dt * A) / A             # (H, N) each
    Cc = complex_of(C)
    h = torch.zeros(u.shape[0], *A.shape, dtype=A.dtype, device=u.device)   # (b, H, N)
    out = []
    for step in range(u.shape[1]):
        h = decay * h + gain * u[:, step, :, None]
        out.append(2 * (Cc * h).sum(-1).real + D * u[:, step])
    return torch.stack(out, dim=1)


# ---------------------------------------------------------------------------------------------- the layer


class S4DLayer(nn.Module, PeftMixerInterface):
    """One S4D layer: FFT convolution with the S4D kernel, + D u, output linear, ReLU. (b, L, H) -> (b, L, H)."""

    display_name = "S4D"
    peft_stages = frozenset()          # no soft-token or state-extension stages: see the module docstring

    def __init__(self, d_model: int, d_state: int, *, A_init: str = "random", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = self.d_inner = H = d_model
        self.d_state = N = d_state
        self.num_directions = 1             # state_shape (H, N): complex states; no hook stage reaches them
        self.A_init, self.dt_min, self.dt_max = A_init, dt_min, dt_max
        self.C = nn.Parameter(torch.empty(H, N, 2, **factory))                # complex, as real pairs
        self.log_dt = nn.Parameter(torch.empty(H, **factory))
        self.log_A_real = nn.Parameter(torch.empty(H, N, **factory))
        self.A_imag = nn.Parameter(torch.empty(H, N, **factory))
        self.D = nn.Parameter(torch.empty(H, **factory))
        self.output_linear = nn.Linear(H, H, bias=True, **factory)
        self.hooks = nn.ModuleList()
        if self.C.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation (S4DKernel, S4D): C ~ complex normal, dt log-uniform, D ~ normal."""
        H, N = self.d_model, self.d_state
        self.C.copy_(torch.view_as_real(torch.randn(H, N, dtype=torch.cfloat)))
        self.log_dt.copy_(torch.rand(H) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        if self.A_init == "default":
            self.log_A_real.fill_(math.log(0.5))
            self.A_imag.copy_(math.pi * torch.arange(N).expand(H, N))
        else:
            self.log_A_real.copy_(torch.log(torch.rand(H, N)))
            self.A_imag.copy_(math.pi * torch.randint(0, N, (H, N)))
        self.D.copy_(torch.randn(H))
        self.output_linear.reset_parameters()

    # ------------------------------------------------------------------ the PEFT interface (model/interface.py)

    def projections(self, role: str) -> list[Projection]:
        if role == "out_proj":
            return [Projection(self, "output_linear", (0, self.d_model))]
        why = {
            "in_proj": "its input is the residual stream itself (no input projection, no gate)",
            "X": "its input is the residual stream itself (no in_proj to take an X half of)",
            "Z": "it has no gate (no in_proj to take a Z half of)",
            "x_proj": "it is time-invariant: dt, B and C are parameters, not computed from the input",
            "dt_proj": "its step is a per-channel parameter (tensor role 'log_dt'), not computed from the input",
            "dt": "its step is a per-channel parameter (tensor role 'log_dt'), not computed from the input",
            "B": "B is folded into C (B = 1), and nothing is computed from the input",
            "C": "C is an (H, N) complex parameter (tensor role 'C'), not computed from the input",
        }
        raise self.not_applicable(f"projection {role!r}", why.get(role, ""))

    def tensors(self, role: str) -> list[TensorSlot]:
        if role in ("C", "log_A_real", "A_imag", "log_dt", "D"):
            return [TensorSlot(self, role)]
        if role == "out_bias":
            return [TensorSlot(unwrap(self.output_linear), "bias")]
        why = {
            "A_log": "its A is complex: -exp(log_A_real) + i A_imag (tensor roles 'log_A_real', 'A_imag')",
            "conv": "its convolution kernel is computed from C, A and dt at every call, not stored",
            "dt_bias": "its step is exp(log_dt) per channel (tensor role 'log_dt'), with no projection bias",
        }
        raise self.not_applicable(f"tensor {role!r}", why.get(role, ""))

    # ------------------------------------------------------------------ forward

    def kernel(self, length: int) -> torch.Tensor:
        """The convolution kernel (H, L), from the parameters as they are now (deltas included)."""
        return s4d_kernel(self.C, self.log_dt, self.log_A_real, self.A_imag, length)

    def ssm(self, u: torch.Tensor) -> torch.Tensor:
        """u (b, L, H) -> K * u + D u (b, L, H): the state-space part, before the output linear."""
        return fft_conv(u, self.kernel(u.shape[1]).to(u.dtype)) + u * self.D

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return F.relu(self.output_linear(self.ssm(u)))


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class S4DOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None       # classifier: (b, classes); theory: the output sequence (b, L, H)


class DeepS4D(nn.Module, PeftModelInterface):
    """A stack of S4D layers, in the "theory" or the "classifier" form (see the module docstring).

    `is_causal` and `head_path` depend on the form: the theory stack's outputs at position l see inputs up to l only
    (causal); the classifier's one output pools every position, and it has the decoder as its head."""

    family = "s4d"
    peft_stages = frozenset()          # no soft prompt stage: see the module docstring
    embedding_path = None

    def __init__(self, config: S4DConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.config = c = config
        self.is_causal = c.form == "theory"
        self.head_path = "decoder" if c.form == "classifier" else None
        if c.form == "classifier":
            self.encoder = nn.Linear(c.d_input, c.d_model, **factory)
        self.layers = nn.ModuleList(
            S4DLayer(c.d_model, c.d_state, A_init=c.A_init, dt_min=c.dt_min, dt_max=c.dt_max, **factory)
            for _ in range(c.n_layers)
        )
        if c.form == "classifier":
            self.decoder = nn.Linear(c.d_model, c.num_classes, **factory)
        self.hooks = nn.ModuleList()

    @property
    def device(self) -> torch.device:
        return self.layers[0].C.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].log_dt.dtype

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def peft_mixers(self) -> list[S4DLayer]:
        return list(self.layers)

    def reset_head(self, num_classes: int | None = None) -> None:
        """A fresh decoder (nn.Linear's default initialisation, as the authors' decoder), for `num_classes` classes
        if given: a new task's head. Classifier form only."""
        if self.config.form != "classifier":
            raise ConfigError(f"an S4D model of form {self.config.form!r} has no decoder (head) to reset")
        if num_classes is not None and num_classes != self.decoder.out_features:
            if not isinstance(num_classes, int) or num_classes < 1:
                raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
            w = self.decoder.weight
            self.decoder = nn.Linear(self.config.d_model, num_classes, device=w.device, dtype=w.dtype)
            self.config = S4DConfig(**{**self.config.to_dict(), "num_classes": num_classes})
        if self.decoder.weight.device.type != "meta":
            self.decoder.reset_parameters()

    def peft_fingerprint(self) -> dict:
        """The architecture an adapter depends on (not the initialisation ranges, dropout or the nominal length)."""
        c = self.config
        keys = ("model_type", "form", "d_model", "n_layers", "d_state")
        keys += ("d_input", "num_classes") if c.form == "classifier" else ()
        return {k: getattr(c, k) for k in keys}

    def peft_inputs(self, batch: int = 2, seed: int = 0) -> dict:
        """Theory: integer-valued inputs 0-9 (the synthetic task's) and a random target sequence; classifier: pixel
        values in [0, 1) and class labels. Length l_max."""
        g = torch.Generator().manual_seed(seed)
        c = self.config
        if c.form == "theory":
            inputs = torch.randint(0, 10, (batch, c.l_max, c.d_model), generator=g).to(self.dtype)
            labels = torch.randn(batch, c.l_max, c.d_model, generator=g).to(self.dtype)
        else:
            inputs = torch.rand(batch, c.l_max, c.d_input, generator=g).to(self.dtype)
            labels = torch.randint(0, c.num_classes, (batch,), generator=g)
        return {"inputs": inputs.to(self.device), "labels": labels.to(self.device)}

    def summary(self) -> dict:
        """Sizes and parameter counts, for `mambapeft info`."""
        per_layer = sum(p.numel() for p in self.layers[0].parameters())
        return {**self.config.to_dict(), "parameters": {
            "total": sum(p.numel() for p in self.parameters()), "per_layer": per_layer,
            "layers": per_layer * len(self.layers),
            **({"encoder": sum(p.numel() for p in self.encoder.parameters()),
                "decoder": sum(p.numel() for p in self.decoder.parameters())} if self.config.form == "classifier"
               else {})}}

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None, **unused) -> S4DOutput:
        """Theory: inputs (b, L, H) -> the output sequence (b, L, H), MSE against labels (b, L, H).
        Classifier: inputs (b, L, d_input) -> logits (b, classes), cross-entropy against labels (b,)."""
        h = inputs.to(self.dtype)
        if self.config.form == "theory":
            for layer in self.layers:
                h = layer(h)
            loss = F.mse_loss(h, labels.to(h.dtype)) if labels is not None else None
            return S4DOutput(loss=loss, logits=h)
        h = self.encoder(h)                                                   # (b, L, H)
        for layer in self.layers:
            branch = layer(h)
            if self.config.dropout and self.training:                        # whole channels, as Dropout1d
                branch = F.dropout1d(branch.mT, self.config.dropout, training=True).mT
            h = h + branch
        logits = self.decoder(h.mean(dim=1)).float()                         # (b, classes)
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return S4DOutput(loss=loss, logits=logits)


def build_s4d(config: str | S4DConfig, *, device=None, dtype=None, seed: int | None = None, **overrides) -> DeepS4D:
    """A randomly initialised DeepS4D from a name ("s4d-theory", ...) or an S4DConfig; device="meta": shapes only."""
    if isinstance(config, str):
        config = s4d_config(config, **overrides)
    elif overrides:
        config = S4DConfig(**{**config.to_dict(), **overrides})
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    return DeepS4D(config, device=device, dtype=dtype)
