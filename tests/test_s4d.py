"""S4D (model/s4d.py) and its methods: the FFT convolution against the float64 recurrence, each S4D method against a
plain restatement written here, SDT's selection against a hand computation, counts, and adapters that reload exactly."""

from __future__ import annotations

import cmath
import json
import math

import pytest
import torch

import mambapeft
from mambapeft import NotApplicable, PeftModel, get_peft_model
from mambapeft.cli.main import main
from mambapeft.errors import CheckpointError, ConfigError
from mambapeft.methods.sdt_s4d import select
from mambapeft.model.s4d.modeling import S4DConfig, fft_conv, s4d_kernel, s4d_recurrence

from conftest import assert_rel_close


def micro(seed=0, dtype=torch.float32, **overrides):
    """The conformance test's S4D model (a classifier) with every weight moved off its init, the same for a seed."""
    model = mambapeft.from_config(S4DConfig(**{**mambapeft.model.s4d.S4D_ARCHITECTURES["s4d-micro"], **overrides}),
                                  seed=seed, dtype=dtype)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def theory(seed=0, **overrides):
    sizes = dict(d_model=5, n_layers=2, d_state=3, form="theory", A_init="random", l_max=13)
    return mambapeft.from_config(S4DConfig(**{**sizes, **overrides}), seed=seed).eval()


@torch.no_grad()
def randomize(peft, seed=2, scale=0.2):
    torch.manual_seed(seed)
    for t in peft.base_model.parameters():
        if t.requires_grad:
            t.add_(torch.randn_like(t) * scale)


def out(model, inputs):
    with torch.no_grad():
        return model(inputs["inputs"]).logits


# ------------------------------------------------------------------ the layer against its recurrence


@pytest.mark.parametrize("length", [1, 2, 17, 64])
def test_fft_convolution_equals_the_recurrence_in_float64(length):
    layer = micro(dtype=torch.float64).layers[0]
    u = torch.randn(3, length, layer.d_model, dtype=torch.float64)
    expected = s4d_recurrence(u, layer.C, layer.log_dt, layer.log_A_real, layer.A_imag, layer.D)
    assert_rel_close(layer.ssm(u), expected, tol=1e-12, what=f"L={length}")


def test_gradients_equal_the_recurrences():
    layer = micro(dtype=torch.float64).layers[1]
    names = ("C", "log_dt", "log_A_real", "A_imag", "D")
    u = torch.randn(2, 23, layer.d_model, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 23, layer.d_model, dtype=torch.float64)
    grads = []
    for compute in (lambda: layer.ssm(u), lambda: s4d_recurrence(u, *(getattr(layer, n) for n in names))):
        layer.zero_grad()
        u.grad = None
        (compute() * weights).sum().backward()
        grads.append([u.grad.clone()] + [getattr(layer, n).grad.clone() for n in names])
    for what, fast, slow in zip(("u",) + names, *grads):
        assert_rel_close(fast, slow, tol=1e-10, what=f"gradient of {what}")


def test_the_kernel_is_the_stated_vandermonde_sum():
    """K[h, l] = 2 Re sum_n C[h, n] (exp(dt A) - 1) / A exp(dt A l), written out with Python's complex numbers."""
    layer = micro(dtype=torch.float64).layers[0]
    K = s4d_kernel(layer.C, layer.log_dt, layer.log_A_real, layer.A_imag, 7)
    h, length = 4, 7
    dt = math.exp(layer.log_dt[h].item())
    for step in range(length):
        total = 0
        for n in range(layer.d_state):
            A = complex(-math.exp(layer.log_A_real[h, n].item()), layer.A_imag[h, n].item())
            C = complex(layer.C[h, n, 0].item(), layer.C[h, n, 1].item())
            total += C * (cmath.exp(dt * A) - 1) / A * cmath.exp(dt * A * step)
        assert K[h, step].item() == pytest.approx(2 * total.real, rel=1e-12, abs=1e-12)


def test_fft_conv_is_causal_and_linear():
    u = torch.randn(2, 9, 3, dtype=torch.float64)
    k = torch.randn(3, 9, dtype=torch.float64)
    direct = torch.stack([sum(k[:, i - j] * u[:, j] for j in range(i + 1)) for i in range(9)], dim=1)
    assert_rel_close(fft_conv(u, k), direct, tol=1e-12)


def test_the_theory_stack_is_causal_and_the_classifier_pools():
    model = theory()
    x = model.peft_inputs(batch=2)["inputs"]
    y = model(x).logits
    changed = x.clone()
    changed[:, 8] += 5.0
    y2 = model(changed).logits
    past, future = (y2 - y)[:, :8].abs().max(), (y2 - y)[:, 8:].abs().max()
    assert past < 1e-5 * y.abs().max() and future > 1e-2 * y.abs().max()     # the FFT rounds at float32's level
    assert model.is_causal and model.head_path is None
    classifier = micro()
    assert not classifier.is_causal and classifier.head_path == "decoder"
    inputs = classifier.peft_inputs(batch=3)
    result = classifier(**inputs)
    assert result.logits.shape == (3, 4) and result.loss.ndim == 0


def test_the_authors_initialisation():
    layer = mambapeft.from_config("s4d-pixels", seed=0).layers[0]
    assert torch.allclose(layer.log_A_real, torch.full_like(layer.log_A_real, math.log(0.5)))
    assert torch.equal(layer.A_imag[3], math.pi * torch.arange(16.0))
    layer = mambapeft.from_config("s4d-theory", seed=0).layers[0]
    assert (layer.log_A_real < 0).all() and torch.allclose(layer.A_imag / math.pi, (layer.A_imag / math.pi).round())
    dt = layer.log_dt.exp()
    assert dt.min() >= 1e-3 and dt.max() <= 1e-1


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="form"):
        S4DConfig(form="default")
    with pytest.raises(ConfigError, match="unknown architecture 's4d-tiny'.*s4d-theory"):
        mambapeft.from_config("s4d-tiny")


# ------------------------------------------------------------------ the methods against plain restatements


def plain_copy(model):
    """The same model without methods, to write each method's effect into by hand."""
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def test_lora_ssm_is_the_stated_low_rank_update():
    base = micro()
    plain = plain_copy(base)
    peft = get_peft_model(base, ["lora_ssm:r=2,s=0.5"])
    randomize(peft)
    with torch.no_grad():
        for layer, mine in zip(base.layers, plain.layers):
            deltas = {name: getattr(layer.parametrizations, name)[0] for name in ("C", "log_A_real", "A_imag")}
            for name in ("log_A_real", "A_imag"):
                getattr(mine, name).add_(0.5 * deltas[name].up @ deltas[name].down)
            up, down = (torch.view_as_complex(t.contiguous()) for t in (deltas["C"].up, deltas["C"].down))
            mine.C.add_(torch.view_as_real(0.5 * up @ down))
    inputs = base.peft_inputs()
    assert_rel_close(out(peft, inputs), out(plain, inputs), tol=1e-5, what="lora_ssm")


@pytest.mark.parametrize("spec, role, attr", [("partial_log_dt", "log_dt", "log_dt"), ("partial_d", "D", "D"),
                                              ("partial_out_bias", "out_bias", "output_linear.bias")])
def test_partial_tensors_are_plain_deltas(spec, role, attr):
    base = micro()
    plain = plain_copy(base)
    peft = get_peft_model(base, [spec])
    randomize(peft)
    with torch.no_grad():
        for layer, mine in zip(base.layers, plain.layers):
            slot = layer.tensors(role)[0]
            delta = getattr(slot.owner.parametrizations, slot.name)[0].delta
            mine.get_parameter(attr).add_(delta)
    inputs = base.peft_inputs()
    assert_rel_close(out(peft, inputs), out(plain, inputs), tol=1e-6, what=spec)


def test_lora_out_proj_on_s4d_is_w_plus_s_up_down():
    base = micro()
    plain = plain_copy(base)
    peft = get_peft_model(base, ["lora_out_proj:r=3,s=0.3,dropout=0"])
    randomize(peft)
    with torch.no_grad():
        for layer, mine in zip(base.layers, plain.layers):
            delta = layer.output_linear.deltas["lora_out_proj"]
            mine.output_linear.weight.add_(0.3 * delta.up @ delta.down)
    inputs = base.peft_inputs()
    assert_rel_close(out(peft, inputs), out(plain, inputs), tol=1e-5, what="lora_out_proj")


SDT = ("sdt:warmup_steps=2,channel_fraction=0.34,state_fraction=0.4,usable_channel_fraction=0.5,"
       "usable_state_fraction=0.6,out_proj=true")


def train(peft, steps, start=0, lr=0.05):
    optimizer = torch.optim.AdamW(peft.parameter_groups(lr=lr, weight_decay=0.0))
    inputs = peft.base_model.peft_inputs(batch=4, seed=5)
    peft.train()
    for step in range(start + 1, start + steps + 1):
        optimizer.zero_grad()
        peft(**inputs).loss.backward()
        optimizer.step()
        peft.on_step_end(step)
    return peft.eval()


def test_sdt_after_its_selection_is_the_stated_sparse_update():
    """C masked outside the usable pairs, sparse deltas on the updatable pairs of C, log_A_real, A_imag, dense
    columns of the output linear at the updatable channels; and only those entries differ after merging."""
    base = micro()
    plain = plain_copy(base)
    pretrained = {k: v.clone() for k, v in plain.state_dict().items()}
    peft = train(get_peft_model(base, [SDT]), 2)
    sdt = peft.methods[0].s4d
    assert peft.methods[0].phase_name() == "sdt sparse"
    train(peft, 2, start=2)
    inputs = base.peft_inputs()
    with torch.no_grad():
        for (_, selection, deltas, columns), mine in zip(sdt.layers, plain.layers):
            ch, st = selection.channels, selection.states
            assert ch.numel() == 2 and st.shape == (2, 2)          # 6 - round(0.66 * 6), 5 - round(0.6 * 5)
            assert selection.usable.sum() == 3 * 3
            mine.C.mul_(selection.usable[..., None])
            for name in ("C", "log_A_real", "A_imag"):
                for i, c in enumerate(ch.tolist()):
                    for j, s in enumerate(st[i].tolist()):
                        getattr(mine, name)[c, s] += deltas[name].values[i, j]
            for i, c in enumerate(ch.tolist()):
                mine.output_linear.weight[:, c] += columns.values[:, i]
            assert deltas["C"].values.abs().sum() > 0 and columns.values.abs().sum() > 0
    assert_rel_close(out(peft, inputs), out(plain, inputs), tol=1e-5, what="sdt on s4d")

    merged = peft.merge_and_unload().state_dict()
    for i, (_, selection, _, _) in enumerate(sdt.layers):
        name = f"layers.{i}"
        moved = merged[f"{name}.log_A_real"] != pretrained[f"{name}.log_A_real"]
        expected = torch.zeros_like(moved)
        expected[selection.channels[:, None], selection.states] = True
        assert torch.equal(moved, expected)
        columns = (merged[f"{name}.output_linear.weight"] != pretrained[f"{name}.output_linear.weight"]).any(0)
        assert columns.nonzero().flatten().tolist() == sorted(selection.channels.tolist())
        for part in ("log_dt", "D", "output_linear.bias"):
            assert torch.equal(merged[f"{name}.{part}"], pretrained[f"{name}.{part}"])


def hand_selection(layer, dense, horizon, u_c, u_s, k_c, k_s):
    """The rule of methods/sdt_s4d.py written out with Python numbers and sorted lists (ties: lower index)."""
    H, N = layer.d_model, layer.d_state
    score, change = [[0.0] * N for _ in range(H)], [[0.0] * N for _ in range(H)]
    for h in range(H):
        dt = math.exp(layer.log_dt[h].item())
        for n in range(N):
            a0, b0 = layer.log_A_real[h, n].item(), layer.A_imag[h, n].item()
            a, b = a0 + dense["log_A_real"][h, n].item(), b0 + dense["A_imag"][h, n].item()
            C = complex(layer.C[h, n, 0].item() + dense["C"][h, n, 0].item(),
                        layer.C[h, n, 1].item() + dense["C"][h, n, 1].item())
            A = complex(-math.exp(a), b)
            score[h][n] = abs(C * (cmath.exp(dt * A) - 1) / A * cmath.exp(dt * A * (horizon // 2)))
            change[h][n] = abs(complex(-math.exp(a) + math.exp(a0), b - b0))

    def top(indices, key, k):
        return sorted(sorted(indices), key=lambda i: -key(i))[:k]

    usable = sorted(top(range(H), lambda h: math.sqrt(sum(s * s for s in score[h])), u_c))
    usable_states = {h: sorted(top(range(N), score[h].__getitem__, u_s)) for h in usable}
    channels = top(usable, lambda h: math.sqrt(sum(c * c for c in change[h])), k_c)
    states = [top(usable_states[h], change[h].__getitem__, k_s) for h in channels]
    mask = [[h in usable and n in usable_states[h] for n in range(N)] for h in range(H)]
    return channels, states, mask


def test_sdt_selection_equals_a_hand_computation():
    base = micro(dtype=torch.float64, d_model=7, d_state=6, n_layers=1)
    layer = base.layers[0]
    torch.manual_seed(7)
    with torch.no_grad():          # steps and decays spread widely, so that the horizon reorders the states
        layer.log_dt.uniform_(-3, 0)
        layer.log_A_real.add_(torch.randn_like(layer.log_A_real))
    peft = get_peft_model(base, ["sdt:warmup_steps=1,channel_fraction=0.3,state_fraction=0.34,"
                                 "usable_channel_fraction=0.6,usable_state_fraction=0.5,horizon=9"])
    with torch.no_grad():
        dense = {name: getattr(layer.parametrizations, name)[0].dense for name in ("C", "log_A_real", "A_imag")}
        for t in dense.values():
            t.copy_(torch.randn_like(t) * 0.3)
        dense = {k: v.clone() for k, v in dense.items()}
        frozen = {name: getattr(layer.parametrizations, name).original.clone()
                  for name in ("C", "log_A_real", "A_imag")}

    class Frozen:   # the layer's pretrained tensors, as hand_selection reads them
        d_model, d_state, log_dt = 7, 6, layer.log_dt
        C, log_A_real, A_imag = frozen["C"], frozen["log_A_real"], frozen["A_imag"]

    # 7 - round(0.7 * 7) = 2 channels among 7 - round(0.4 * 7) = 4 usable; 6 - round(0.66 * 6) = 2 states among 3
    channels, states, mask = hand_selection(Frozen, dense, 9, 4, 3, 2, 2)
    peft.on_step_end(1)
    selection = peft.methods[0].s4d.layers[0][1]
    assert selection.channels.tolist() == channels
    assert selection.states.tolist() == states
    assert selection.usable.tolist() == mask
    assert len(set(channels)) == 2 and all(len(set(s)) == 2 for s in states)


def test_select_ranks_ties_to_the_lower_index():
    H, N = 4, 3
    C = torch.zeros(H, N, 2, dtype=torch.float64)
    C[..., 0] = 1.0
    zeros = torch.zeros(H, N, dtype=torch.float64)
    channels, states, mask = select(C, torch.zeros(H, dtype=torch.float64), zeros, zeros, zeros, zeros,
                                    horizon=4, usable_channels=2, usable_states=2, channels=1, states=1)
    assert channels.tolist() == [0] and states.tolist() == [[0]]
    assert mask.nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_sdt_refuses_bad_sizes_and_its_s4d_options_elsewhere():
    with pytest.raises(ConfigError, match="exceed"):
        get_peft_model(micro(), ["sdt:channel_fraction=0.9,usable_channel_fraction=0.5"])
    with pytest.raises(NotApplicable, match="usable_state_fraction, out_proj are options of SDT on S4D"):
        get_peft_model(mambapeft.from_config("mamba-micro", seed=0), ["sdt:usable_state_fraction=0.5,out_proj=true"])
    with pytest.raises(ConfigError, match="clash"):
        get_peft_model(micro(), ["sdt", "lora_ssm"])


def test_the_synthetic_preset_is_the_authors_run():
    peft = get_peft_model(mambapeft.from_config("s4d-theory", seed=0), ["paper/sdt_s4d"])
    c = peft.methods[0].config
    assert (c.warmup_steps, c.restart, c.out_proj) == (20, True, True)
    peft.on_step_end(20)
    (layer, selection, deltas, columns), *_ = peft.methods[0].s4d.layers
    assert selection.states.shape == (16, 8) and selection.usable.sum() == 16 * 8 and columns.values.shape == (64, 16)


# ------------------------------------------------------------------ save, load, counts, the CLI


@pytest.mark.parametrize("specs", [[SDT, "lora_out_proj:r=2", "partial_log_dt"], ["lora_ssm:r=2", "partial_out_bias"]])
def test_adapters_save_and_load_bit_exactly(specs, tmp_path):
    peft = train(get_peft_model(micro(), specs), 3)
    inputs = peft.base_model.peft_inputs()
    expected = out(peft, inputs)
    tensors = {k: v.clone() for k, v in peft.adapter_tensors().items()}
    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(micro(), tmp_path).eval()
    assert torch.equal(out(loaded, inputs), expected)
    reloaded = loaded.adapter_tensors()
    assert tensors.keys() == reloaded.keys() and all(torch.equal(tensors[k], reloaded[k]) for k in tensors)
    assert loaded.parameter_counts() == peft.parameter_counts()


def test_an_adapter_saved_in_the_warm_up_resumes_it(tmp_path):
    peft = train(get_peft_model(micro(), [SDT]), 1)
    assert peft.methods[0].phase_name() == "sdt warm-up"
    peft.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(micro(), tmp_path)
    assert resumed.methods[0].phase_name() == "sdt warm-up"
    train(resumed, 1, start=1)
    assert resumed.methods[0].phase_name() == "sdt sparse"


def test_an_adapter_refuses_another_architecture(tmp_path):
    get_peft_model(micro(), ["lora_ssm"]).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="d_state"):
        PeftModel.from_pretrained(micro(d_state=4), tmp_path)


def params(capsys, arch, *specs):
    args = ["params", arch, "--json"]
    for spec in specs:
        args += ["-m", spec]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_counts_through_the_cli(capsys):
    """s4d-theory: H 64, N 16, 4 layers; each count written out from the shapes."""
    H, N, layers, base = 64, 16, 4, 33_536
    assert base == layers * (H * N * 2 + 2 * H * N + 2 * H + H * H + H)
    expected = {
        "lora_ssm:r=4": layers * (4 * (H + N) * 2 + 2 * 4 * (H + N)),        # C complex (pairs), log_A_real, A_imag
        "lora_out_proj:r=16": layers * 16 * (H + H),
        "partial_log_dt": layers * H, "partial_d": layers * H, "partial_out_bias": layers * H,
        "paper/sdt_s4d": layers * (16 * 8 * 4 + H * 16),                     # C 2 + log_A_real 1 + A_imag 1; columns
        "sdt:channel_fraction=0.25,state_fraction=0.5": layers * 16 * 8 * 4,
        "full": base,
    }
    for spec, trainable in expected.items():
        result = params(capsys, "s4d-theory", spec)
        assert result["trainable"] == trainable, spec
        assert result["base"] == base
    result = params(capsys, "s4d-theory", "paper/sdt_s4d", "lora_out_proj:r=16")
    assert result["trainable"] == layers * (16 * 8 * 4 + H * 16) + layers * 16 * 2 * H
    assert "C zeroed outside 16 usable channels x 8 usable states" in next(iter(result["notes"].values()))
    assert params(capsys, "s4d-pixels", "linear_probe")["trainable"] == 64 * 10 + 10


def test_methods_lists_an_s4d_column(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    families = header[: header.index("(x:")]
    assert {"mamba", "vim", "s4d"} <= set(families)
    rows = {line.split()[0]: dict(zip(families, line.split()[1:])) for line in lines if line.startswith("  ")
            and not line.startswith("    ")}
    assert (rows["lora_ssm"]["s4d"], rows["lora_ssm"]["mamba"], rows["sdt"]["s4d"]) == ("x", "-", "x")
    assert (rows["lora_p_x"]["s4d"], rows["partial_d"]["s4d"], rows["lora_out_proj"]["s4d"]) == ("-", "x", "x")
    assert main(["methods", "lora_in_proj"]) == 0
    why = "not on s4d: S4D has no projection 'in_proj': its input is the residual stream itself"
    assert why in capsys.readouterr().out


def test_info_describes_an_s4d_architecture(capsys):
    assert main(["info", "s4d-theory", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"]["total"] == 33_536 and summary["form"] == "theory"


@pytest.mark.parametrize("magnitude", ["output", "input"])
def test_dora_on_a_biased_layer_merges_to_what_it_computes(magnitude):
    """S4D's output linear has a bias: DoRA scales the weight's output, not the bias (as merging leaves it)."""
    peft = get_peft_model(micro(), [f"dora_out_proj:r=2,magnitude={magnitude},dropout=0"])
    randomize(peft)
    inputs = peft.base_model.peft_inputs()
    expected = out(peft, inputs)
    assert_rel_close(out(peft.merge_and_unload(), inputs), expected, tol=1e-5, what=f"dora {magnitude}")
