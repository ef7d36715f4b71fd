"""VMamba (Liu et al. 2024) as MambaPEFT fine-tunes it, channel-last, with the key names of the released checkpoints.

The released `vssm_small_0229` / `vssm_base_0229` (configs vmambav2_{small,base}_224: forward type "v05_noz",
patch embed v2, downsample v3, N = 1), written top to bottom in plain PyTorch. Shapes: batch b, grid H x W,
L = H W tokens, stage width d, inner width E = ssm_ratio * d, state size N, dt rank R; the 4 scan directions k.

    pixel_values (b, 3, H0, W0) --patch_embed: conv 3x3/2, LN, GELU, conv 3x3/2, LN--> h (b, H0/4, W0/4, d)
    4 stages of VSS blocks (d, 2d, 4d, 8d), a downsample between them (conv 3x3/2 + LN: H, W halve, d doubles)
    [model hooks: begin_forward, e.g. to compute every block's affix tokens once]
    classifier: norm --> mean over H, W --> features (b, 8d) --> head --> logits (b, classes)

VSS block:  h = h + DropPath(op(norm(h)));  h = h + DropPath(mlp(norm2(h)))      (op = SS2D, mlp = fc1 GELU fc2)

SS2D on x (b, H, W, d):
    in_proj (no bias, no z gate) --> (b, H, W, E) --depthwise conv 3x3 (no bias)--> SiLU
    cross-scan --> xs (b, 4, L, E): k0 row-major (token h W + w), k1 column-major (w H + h), k2, k3 their flips
    [affix tokens enter here, per direction (hook stage "after_cross_scan"); dropped again before the merge]
    per direction k: x_proj_weight[k] (R+2N, E) --> [dt_low (R) | B (N) | C (N)];  dt = dt_projs_weight[k] dt_low
    [extra state dimensions join here: columns of A, rows of B and C (hook extend_state, per direction)]
    selective scan per direction and channel: A = -exp(A_logs), D = Ds, delta = softplus(dt + dt_projs_bias)
    cross-merge: y = ys0 + flip(ys2) + T(ys1 + flip(ys3)), T taking column-major order back to (H, W)
    out_norm (LayerNorm over E) --> out_proj (no bias) --> (b, H, W, d)

PEFT-readiness, as in mixer.py: in_proj, conv2d, out_norm and out_proj are called as modules (a wrapper replacing one
cannot be bypassed), and so are x_proj and dt_proj: `StackedLinear`s (model/interface.py) that hold no tensor and
read the stacked per-direction weights x_proj_weight (4, R+2N, E) and dt_projs_weight (4, E, R) at every call (the
checkpoint keeps those names). Those two, dt_projs_bias (4, E), A_logs (4E, N) and Ds (4E) are read as attributes at
every call, so a parametrization can add a (per-direction) delta to any of them; `hooks` on each SS2D and on the
model hold PeftHooks.

The PEFT interface (model/interface.py), per direction k where the paper's code has one of a thing per direction:
    in_proj, X        in_proj (all rows: "v05_noz" has no z gate, so there is no Z)
    x_proj, dt, B, C  x_proj direction k, its rows [dt | B | C]        dt_proj   dt_proj direction k
    out_proj          out_proj (after out_norm; the parallel adapter reads out_norm's output)
    A_log, D          rows k E .. (k+1) E of A_logs, Ds                dt_bias   dt_projs_bias[k]
    conv              conv2d.weight (one depthwise 3x3 kernel, before the cross-scan: shared by the directions)
    norm              out_norm.weight
    stages            after_cross_scan (soft tokens of width E per direction, dropped before the merge: affix),
                      extend_state, initial_state (E, N) and state_offset (h' (E, N) through C_t, or y' (E)), per
                      direction; VMamba has no gate, so offsets add to each direction's output before the merge.
    model             no "embeddings" stage (no token sequence at model level: prompt tuning does not apply);
                      embedding = patch_embed.0 (the stem's first conv), head = classifier.head

The upstream model is channel-first (LayerNorm2d, 1x1-conv "Linear2d"); this port is channel-last with nn.Linear and
nn.LayerNorm over the last axis: the same function with the same weights (a Linear2d weight (out, in, 1, 1) loads as
(out, in)). Sequential indices (patch_embed.{0,2,5,7}, downsample.{1,3}) are kept with placeholder permutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConfigError, NotApplicable
from ...scan import selective_scan_grouped
from ..checkpoint import write_model_folder
from ..config import FamilyConfig
from ..hooks import drop_inserted, insert_from_hooks
from ..interface import PeftMixerInterface, PeftModelInterface, Projection, StackedLinear, TensorSlot, unwrap
from ..vim import VimOutput

DIRECTIONS = 4          # k0 row-major, k1 column-major, k2 / k3 their reverses
# our folder format (VMamba.save_pretrained writes it, model/vmamba/loading.py load_vmamba reads it)
FORMAT = "mambapeft-vmamba"


@dataclass
class VMambaConfig(FamilyConfig):
    """The sizes of a VMamba; everything an adapter or a checkpoint depends on."""

    title = "VMamba"
    positive_ints = ("embed_dim", "img_size", "patch_size", "in_chans", "num_classes", "d_state", "d_conv")

    embed_dim: int = 96                     # width d of stage 0; stage i has embed_dim * 2**i
    depths: tuple[int, ...] = (2, 2, 15, 2)
    img_size: int = 224                     # the training resolution (no position embedding: any size runs)
    patch_size: int = 4                     # total stride of the patch embedding (two convs of stride patch/2)
    in_chans: int = 3
    num_classes: int = 1000
    d_state: int = 1
    ssm_ratio: float = 2.0                  # E = int(ssm_ratio * d)
    dt_rank: int | None = None              # None: "auto", ceil(d / 16) in each stage
    d_conv: int = 3
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0             # stochastic depth, rising linearly from 0 over the blocks (train mode)
    norm_eps: float = 1e-5
    model_type: str = "vmamba"

    def validate(self):
        self.depths = tuple(self.depths)
        if not self.depths or not all(isinstance(n, int) and n >= 1 for n in self.depths):
            raise ConfigError(f"VMamba config: depths={self.depths!r} must be positive integers (blocks per stage)")
        if self.patch_size % 2:
            raise ConfigError(f"VMamba config: patch_size={self.patch_size} must be even (two convs of stride patch/2)")
        if self.embed_dim % 2:
            raise ConfigError(f"VMamba config: embed_dim={self.embed_dim} must be even (the stem's first conv has d/2)")
        if self.d_conv % 2 == 0:
            raise ConfigError(f"VMamba config: d_conv={self.d_conv} must be odd (a centred depthwise kernel)")
        if not self.ssm_ratio > 0 or not self.mlp_ratio > 0:
            raise ConfigError(f"VMamba config: ssm_ratio={self.ssm_ratio} and mlp_ratio={self.mlp_ratio} must be > 0")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"VMamba config: drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if self.dt_rank is not None and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ConfigError(f"VMamba config: dt_rank={self.dt_rank!r} must be a positive integer or None (auto)")

    @property
    def dims(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(len(self.depths))]

    @property
    def num_features(self) -> int:
        return self.dims[-1]

    def drop_path_rates(self) -> list[float]:
        """Per block, linear from 0 to drop_path_rate (upstream: torch.linspace(0, rate, sum(depths)))."""
        return torch.linspace(0, self.drop_path_rate, sum(self.depths), device="cpu").tolist()


# Named architectures. small / base: vssm_{small,base}_0229 (MambaPEFT's backbones; drop path as in its fine-tuning
# recipe); tiny: the released VMamba-T, vssm1_tiny_0230s (ssm_ratio 1); micro: a tiny model for tests.
VMAMBA_ARCHITECTURES: dict[str, dict] = {
    "vmamba-tiny": dict(embed_dim=96, depths=(2, 2, 8, 2), ssm_ratio=1.0, drop_path_rate=0.2),
    "vmamba-small": dict(embed_dim=96, depths=(2, 2, 15, 2), drop_path_rate=0.3),
    "vmamba-base": dict(embed_dim=128, depths=(2, 2, 15, 2), drop_path_rate=0.6),
    "vmamba-micro": dict(embed_dim=8, depths=(1, 1, 2, 1), img_size=32, num_classes=10),
}


def vmamba_config(name: str, **overrides) -> VMambaConfig:
    """The VMambaConfig of a named architecture ("vmamba-small", ...), with any field overridden."""
    return VMambaConfig.named(VMAMBA_ARCHITECTURES, name, **overrides)


# ---------------------------------------------------------------- the pieces


class Permute(nn.Module):
    """Holds the place of upstream's channel-first <-> channel-last permutes, so Sequential indices match."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class DropPath(nn.Module):
    """Stochastic depth: in train mode, drops a sample's whole residual branch with probability p (rescaling the
    kept ones by 1 / (1 - p)); the identity in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


def make_patch_embed(config: VMambaConfig, **factory) -> nn.Sequential:
    """Patch embed v2: (b, C, H, W) -> (b, H/4, W/4, d); two overlapping stride-2 convs (stride patch/2 each)."""
    d, stride, eps = config.embed_dim, config.patch_size // 2, config.norm_eps
    return nn.Sequential(
        nn.Conv2d(config.in_chans, d // 2, stride + 1, stride=stride, padding=1, **factory),   # 0
        Permute(0, 2, 3, 1),                                                                    # 1
        nn.LayerNorm(d // 2, eps=eps, **factory),                                              # 2
        Permute(0, 3, 1, 2),                                                                    # 3
        nn.GELU(),                                                                              # 4
        nn.Conv2d(d // 2, d, stride + 1, stride=stride, padding=1, **factory),                 # 5
        Permute(0, 2, 3, 1),                                                                    # 6
        nn.LayerNorm(d, eps=eps, **factory),                                                   # 7
    )


def make_downsample(d: int, eps: float, **factory) -> nn.Sequential:
    """Downsample v3: (b, H, W, d) -> (b, H/2, W/2, 2d), a 3x3 stride-2 conv then LayerNorm."""
    return nn.Sequential(
        Permute(0, 3, 1, 2),                                                                    # 0
        nn.Conv2d(d, 2 * d, 3, stride=2, padding=1, **factory),                                # 1
        Permute(0, 2, 3, 1),                                                                    # 2
        nn.LayerNorm(2 * d, eps=eps, **factory),                                               # 3
    )


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(b, H, W, E) -> the four scan orders (b, 4, L, E): row-major, column-major and their reverses."""
    b, H, W, E = x.shape
    rows = x.reshape(b, H * W, E)                       # k0: token h W + w
    cols = x.transpose(1, 2).reshape(b, H * W, E)       # k1: token w H + h
    return torch.stack([rows, cols, rows.flip(1), cols.flip(1)], dim=1)


def cross_merge(ys: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(b, 4, L, E) -> (b, H, W, E): each direction's outputs back on the grid, summed."""
    b, _, _, E = ys.shape
    rows = ys[:, 0] + ys[:, 2].flip(1)                  # row-major
    cols = ys[:, 1] + ys[:, 3].flip(1)                  # column-major: (W, H) order
    return rows.view(b, H, W, E) + cols.view(b, W, H, E).transpose(1, 2)


class SS2D(nn.Module, PeftMixerInterface):
    """The 2-D selective scan of VMamba ("v05_noz"); see the module docstring for the data flow."""

    display_name = "VMamba"
    peft_stages = frozenset({"after_cross_scan", "extend_state", "initial_state", "state_offset"})
    num_directions = DIRECTIONS

    def __init__(self, d_model: int, *, d_state: int = 1, ssm_ratio: float = 2.0, dt_rank: int | None = None,
                 d_conv: int = 3, norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_inner = E = int(ssm_ratio * d_model)
        self.d_state = N = d_state
        self.dt_rank = R = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        K = DIRECTIONS

        self.in_proj = nn.Linear(d_model, E, bias=False, **factory)
        self.conv2d = nn.Conv2d(E, E, d_conv, padding=(d_conv - 1) // 2, groups=E, bias=False, **factory)
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, E, **factory))    # per direction [dt | B | C]
        self.dt_projs_weight = nn.Parameter(torch.empty(K, E, R, **factory))
        self.x_proj = StackedLinear(self, "x_proj_weight")          # called modules over the two (no tensors)
        self.dt_proj = StackedLinear(self, "dt_projs_weight")
        self.dt_projs_bias = nn.Parameter(torch.empty(K, E, **factory))
        self.A_logs = nn.Parameter(torch.empty(K * E, N, **factory))                  # direction k: rows k E ...
        self.Ds = nn.Parameter(torch.empty(K * E, **factory))
        self.out_norm = nn.LayerNorm(E, eps=norm_eps, **factory)
        self.out_proj = nn.Linear(E, d_model, bias=False, **factory)
        self.hooks = nn.ModuleList()
        if self.A_logs.device.type != "meta":
            self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
        """Upstream's "v0" initialisation: x_proj as nn.Linear's default, S4D-real A, D = 1, dt log-uniform in
        [dt_min, dt_max] through the bias (inverse softplus), dt_proj weights uniform in +-R^-0.5."""
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        bound = E**-0.5
        self.x_proj_weight.uniform_(-bound, bound)
        self.dt_projs_weight.uniform_(-(R**-0.5), R**-0.5)
        dt = torch.exp(torch.rand(DIRECTIONS, E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_logs.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(DIRECTIONS * E, N))
        self.Ds.fill_(1.0)

    # -------------------------------------------------- the PEFT interface (model/interface.py)

    def projections(self, role: str) -> list[Projection]:
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        if role in ("in_proj", "X"):
            return [Projection(self, "in_proj", (0, E))]
        if role == "out_proj":
            return [Projection(self, "out_proj", (0, self.d_model))]
        if role == "Z":
            raise self.not_applicable("Z", "its SS2D ('v05_noz') has no z gate: in_proj computes X alone (use "
                                           "lora_p_x, which is LoRA on the whole in_proj here, or lora_in_proj)")
        rows = {"x_proj": ("x_proj", (0, R + 2 * N)), "dt": ("x_proj", (0, R)), "B": ("x_proj", (R, R + N)),
                "C": ("x_proj", (R + N, R + 2 * N)), "dt_proj": ("dt_proj", (0, E))}
        if role not in rows:
            raise self.not_applicable(f"projection {role!r}")
        attr, block = rows[role]
        return [Projection(self, attr, block, k) for k in range(DIRECTIONS)]

    def tensors(self, role: str) -> list[TensorSlot]:
        E = self.d_inner
        if role in ("A_log", "D"):
            name = {"A_log": "A_logs", "D": "Ds"}[role]
            return [TensorSlot(self, name, k, index=(k * E, (k + 1) * E)) for k in range(DIRECTIONS)]
        if role == "dt_bias":
            return [TensorSlot(self, "dt_projs_bias", k, index=k) for k in range(DIRECTIONS)]
        if role == "conv":
            return [TensorSlot(unwrap(self.conv2d), "weight")]
        if role == "norm":
            return [TensorSlot(unwrap(self.out_norm), "weight")]
        raise self.not_applicable(f"tensor {role!r}")

    def soft_token_width(self, stage: str) -> int:
        if stage != "after_cross_scan":
            return super().soft_token_width(stage)
        return self.d_inner

    def token_stage(self, where: str) -> str:
        return "after_cross_scan" if where == "after_in_proj" else where

    # -------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, H, W, d) -> (b, H, W, d)."""
        b, H, W, _ = x.shape
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        x = self.in_proj(x)                                                          # (b, H, W, E)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)           # depthwise 3x3, (b, H, W, E)
        xs = cross_scan(x)                                                           # (b, 4, L, E)
        xs, kept = self._insert_tokens(xs)                                           # affix tokens in: (b, 4, L', E)

        x_dbl = self.x_proj(xs)                                                      # (b, 4, L', R + 2N)
        dt_low, B, C = x_dbl.split([R, N, N], dim=-1)
        dt = self.dt_proj(dt_low)                                                    # (b, 4, L', E)
        C_pretrained = C                                                             # state offsets read these
        A_log, B, C = self._extend_state(xs, self.A_logs.view(DIRECTIONS, E, N), B, C)   # N -> n states
        ys = selective_scan_grouped(
            xs, dt, -torch.exp(A_log.float()), B.contiguous(), C.contiguous(),
            D=self.Ds.view(DIRECTIONS, E), delta_bias=self.dt_projs_bias, delta_softplus=True,
            initial_state=self._initial_state(b),
        )                                                                            # (b, 4, L', E)
        ys = self._add_offsets(ys, C_pretrained)
        ys = self._drop_tokens(ys, kept)                                             # affix tokens out: (b, 4, L, E)
        y = cross_merge(ys, H, W)                                                    # (b, H, W, E)
        return self.out_proj(self.out_norm(y))                                       # (b, H, W, d)

    # -------------------------------------------------- PEFT hooks (no-ops without hooks)

    def _insert_tokens(self, xs: torch.Tensor):
        """Each hook's soft tokens (width E) into each direction's sequence, after the cross-scan: they bypass
        in_proj, the conv and SiLU, and pass through x_proj, dt_proj and the scan."""
        if not len(self.hooks):
            return xs, None
        seqs, kept = [], []
        for k in range(DIRECTIONS):
            seq, _, kept_k = insert_from_hooks(self.hooks, "after_cross_scan", k, xs[:, k], None, 0)
            seqs.append(seq)
            kept.append(kept_k)
        if len({s.shape[1] for s in seqs}) != 1:
            raise ValueError(f"soft tokens after the cross-scan must be as many in every direction, got sequence "
                             f"lengths {[s.shape[1] for s in seqs]}")
        return torch.stack(seqs, dim=1), kept

    @staticmethod
    def _drop_tokens(ys: torch.Tensor, kept) -> torch.Tensor:
        if kept is None or not any(kept):
            return ys
        return torch.stack([drop_inserted(ys[:, k], kept[k]) for k in range(DIRECTIONS)], dim=1)

    def _extend_state(self, xs: torch.Tensor, A_log: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
        """Extra state dimensions from the hooks, per direction k: A_log (E, N), B and C (b, L, N) -> N' states."""
        if not len(self.hooks):
            return A_log, B, C
        parts = []
        for k in range(DIRECTIONS):
            a_k, b_k, c_k = A_log[k], B[:, k], C[:, k]
            for hook in self.hooks:
                a_k, b_k, c_k = hook.extend_state(k, xs[:, k], a_k, b_k, c_k)
            parts.append((a_k, b_k, c_k))
        if len({p[0].shape[1] for p in parts}) != 1:
            raise ValueError(f"extra state dimensions must be as many in every direction, got "
                             f"{[p[0].shape[1] for p in parts]}")
        return (torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts], dim=1),
                torch.stack([p[2] for p in parts], dim=1))

    def _initial_state(self, batch: int) -> torch.Tensor | None:
        """The hooks' initial state of each direction (b, 4, E, n), the added states' part zero, or None (zeros)."""
        if not len(self.hooks):
            return None
        per_direction = []
        for k in range(DIRECTIONS):
            starts = [h0 for hook in self.hooks if (h0 := hook.initial_state(k)) is not None]
            if not starts:
                return None
            h0 = sum(starts)                                                          # (E, N)
            for hook in self.hooks:
                h0 = hook.extend_initial(k, h0)                                       # (E, n)
            per_direction.append(h0.to(torch.promote_types(h0.dtype, torch.float32)))    # at least float32
        return torch.stack(per_direction).expand(batch, -1, -1, -1)

    def _add_offsets(self, ys: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """ys (b, 4, L, E) plus the hooks' state offsets of each direction: C_t h' with C (b, 4, L, N) of the pretrained
        states and h' (E, N), or y' (E). No gate follows the scan in "v05_noz", so they add to the output itself."""
        for hook in self.hooks:
            found = [hook.state_offset(k) for k in range(DIRECTIONS)]
            if found[0] is None:
                continue
            kind = found[0][0]
            values = torch.stack([value for _, value in found]).to(ys.dtype)          # (4, E, N) or (4, E)
            if kind == "h":
                ys = ys + torch.einsum("bkln,ken->bkle", C.to(ys.dtype), values)
            else:
                ys = ys + values[:, None]
        return ys


class Mlp(nn.Module):
    def __init__(self, d: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VSSBlock(nn.Module):
    """h + DropPath(SS2D(LN(h))), then h + DropPath(MLP(LN(h))); channel-last (b, H, W, d)."""

    def __init__(self, d: int, config: VMambaConfig, drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(d, eps=config.norm_eps, **factory)
        self.op = SS2D(d, d_state=config.d_state, ssm_ratio=config.ssm_ratio, dt_rank=config.dt_rank,
                       d_conv=config.d_conv, norm_eps=config.norm_eps, **factory)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(d, eps=config.norm_eps, **factory)
        self.mlp = Mlp(d, int(d * config.mlp_ratio), **factory)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.drop_path(self.op(self.norm(h)))
        return h + self.drop_path(self.mlp(self.norm2(h)))


class VSSStage(nn.Module):
    """The blocks of one stage, then the downsample to the next (none after the last)."""

    def __init__(self, d: int, depth: int, config: VMambaConfig, drop_paths: list[float], downsample: bool,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.blocks = nn.Sequential(*(VSSBlock(d, config, p, **factory) for p in drop_paths[:depth]))
        self.downsample = make_downsample(d, config.norm_eps, **factory) if downsample else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(h))


class Classifier(nn.Module):
    """classifier.norm, average over the grid, classifier.head (upstream's nn.Sequential, pooling inlined)."""

    def __init__(self, d: int, num_classes: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps, device=device, dtype=dtype)
        self.head = nn.Linear(d, num_classes, device=device, dtype=dtype)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h).mean(dim=(1, 2))                                 # (b, H, W, d) -> (b, d)


# ---------------------------------------------------------------- the model


class VMamba(nn.Module, PeftModelInterface):
    """VMamba classifier, on the PEFT interface (model/interface.py; its mixers are the SS2Ds)."""

    family = "vmamba"
    is_causal = False                      # four directions: every output sees every token
    peft_stages = frozenset()              # a 2-D grid until each SS2D's cross-scan: no model-level token sequence
    embedding_path = "patch_embed.0"       # the stem's first conv (lora_embed)
    head_path = "classifier.head"

    def __init__(self, config: VMambaConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.config = config
        dims, depths = config.dims, config.depths
        rates = config.drop_path_rates()
        self.patch_embed = make_patch_embed(config, **factory)
        self.layers = nn.ModuleList(
            VSSStage(dims[i], depths[i], config, rates[sum(depths[:i]):], i < len(depths) - 1, **factory)
            for i in range(len(depths))
        )
        self.classifier = Classifier(config.num_features, config.num_classes, config.norm_eps, **factory)
        self.hooks = nn.ModuleList()       # model-level PeftHooks (begin_forward: e.g. all blocks' affix tokens)
        if self.classifier.head.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None):
        """Random initialisation in the style of upstream (trunc-normal Linear weights; loading overwrites it)."""
        if seed is not None:
            torch.manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                module.reset_parameters()
            elif isinstance(module, SS2D):
                module.reset_ssm_parameters()
        self.reset_head()

    @torch.no_grad()
    def reset_head(self, num_classes: int | None = None) -> None:
        """A fresh zero-initialised head (mmpretrain's VisionTransformerClsHead, as MambaPEFT), for `num_classes`."""
        head = self.classifier.head
        if num_classes is not None and num_classes != head.out_features:
            if num_classes < 1:
                raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
            w = head.weight
            self.classifier.head = head = nn.Linear(self.config.num_features, num_classes, device=w.device,
                                                    dtype=w.dtype)
            self.config = VMambaConfig(**{**self.config.to_dict(), "num_classes": num_classes})
        if head.weight.device.type != "meta":
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @property
    def paper_drop_path(self) -> float:
        """Stochastic depth of the paper's fine-tuning: the pretraining rate, kept on (0.3 for S, 0.6 for B; the
        VTAB configs keep `drop_path_rate` of the backbone); a loaded checkpoint's training config gives it."""
        return self.config.drop_path_rate

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 at the first block to `rate` at the last (upstream's rule)."""
        if not 0 <= rate < 1:
            raise ConfigError(f"drop path rate {rate} must be in [0, 1)")
        self.config = VMambaConfig(**{**self.config.to_dict(), "drop_path_rate": rate})
        blocks = [block for stage in self.layers for block in stage.blocks]
        for block, p in zip(blocks, self.config.drop_path_rates()):
            block.drop_path.p = p

    def model_tensor(self, role: str) -> TensorSlot:
        raise NotApplicable(f"VMamba has no {role}: it has no class token (the classifier averages the last stage's "
                            f"features) and no position embedding (the convolutions and the scan orders place the "
                            f"patches)")

    def peft_inputs(self, batch: int = 2, seed: int = 0) -> dict:
        """Images whose last stage still scans a 2 x 3 grid (at 32 px it would be one token, where A gets no
        gradient), non-square so that rows and columns cannot be confused: 64 x 96 px at the total stride 32."""
        g = torch.Generator().manual_seed(seed)
        c = self.config
        stride = c.patch_size * 2 ** (len(c.depths) - 1)
        height, width = max(c.img_size, 2 * stride), max(c.img_size, 3 * stride)
        images = torch.randn(batch, c.in_chans, height, width, generator=g)
        labels = torch.randint(0, c.num_classes, (batch,), generator=g)
        return {"pixel_values": images.to(self.device), "labels": labels.to(self.device)}

    def save_pretrained(self, folder) -> None:
        """config.json + model.safetensors, which load_vmamba reads back (PEFT parts must be merged or saved apart)."""
        write_model_folder(self, folder, {"format": FORMAT, **self.config.to_dict()})

    @property
    def device(self) -> torch.device:
        return self.classifier.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.classifier.head.weight.dtype

    @property
    def d_model(self) -> int:
        """The width after the patch embedding (stage 0); the stages widen to 8 d_model."""
        return self.config.embed_dim

    def peft_mixers(self) -> list[SS2D]:
        return [block.op for stage in self.layers for block in stage.blocks]

    def peft_fingerprint(self) -> dict:
        """The architecture an adapter depends on (not the resolution: there is no position embedding)."""
        c = self.config.to_dict()
        for key in ("norm_eps", "drop_path_rate", "img_size"):
            c.pop(key)
        return c

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (b, C, H, W) -> the pooled features after classifier.norm (b, 8d)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.in_chans:
            raise ValueError(f"expected images (batch, {self.config.in_chans}, height, width), got "
                             f"{tuple(pixel_values.shape)}")
        for hook in self.hooks:
            hook.begin_forward(0)
        h = self.patch_embed(pixel_values.to(self.dtype))                   # (b, H/4, W/4, d)
        for stage in self.layers:
            h = stage(h)                                                     # ... (b, H/32, W/32, 8d)
        return self.classifier.features(h)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **unused) -> VimOutput:
        """pixel_values (b, C, H, W) -> logits (b, num_classes); cross-entropy loss when labels (b,) are given."""
        features = self.forward_features(pixel_values)
        logits = self.classifier.head(features).float()
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return VimOutput(loss=loss, logits=logits, features=features)


def build_vmamba(config: str | VMambaConfig, *, device=None, dtype=None, seed: int | None = None,
                 **overrides) -> VMamba:
    """A randomly initialised VMamba from a name ("vmamba-small", ...) or a VMambaConfig; device="meta": shapes only."""
    if isinstance(config, str):
        config = vmamba_config(config, **overrides)
    elif overrides:
        config = VMambaConfig(**{**config.to_dict(), **overrides})
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    return VMamba(config, device=device, dtype=dtype)
