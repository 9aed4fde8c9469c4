"""A transformer encoder block, a decoder block and an LSTM, compiled by eiec and run on its simulator.

The blocks are torch.nn.TransformerEncoderLayer's graph (post-LN, ReLU FFN; Q/K/V as three
Linear layers, as Hugging Face writes them), the decoder block the same with a causal
mask, built with onnx.helper (tests/sequence_models.py) at batch 1; the LSTM is NT-LSTM's
size (600 inputs, 600 hidden, 2400 gate rows). Every weight matrix is drawn N(0, 1/fan-in)
at exactly `--density` (as bench/eie_layers.py draws the paper's layers), and eiec compiles
with `density: keep` and a 4-bit codebook for 64 PEs: the accuracy figures are weight
sharing's and the fixed-point datapath's, not pruning's. Per model: the compression ratio,
cycles per token (per time step for the LSTM) by layer, load balance, the relative L2 error
against onnxruntime running the original (max over the outputs), `eiec validate`'s
exactness, and onnxruntime's dense fp32 time for the same block (one input) in the same run.
Columns: fixed / huffman = compression ratio of the PE-memory form / the storage form;
cycles = the accelerator's cycles per token (per time step), summed over the layers.
Usage: python bench/transformer.py [--density 0.1] [--tokens 32] [--steps 8]
       [--out bench/results/transformer.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import onnx
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from eie_layers import RESULTS, command_line, machine_info, ort_session, random_positions, seconds, write_json  # noqa: E402
from eiec.driver import compile_model  # noqa: E402
from eiec.runtime import InferenceSession  # noqa: E402
from eiec.runtime.validate import validate  # noqa: E402
from sequence_models import recurrent, transformer_block  # noqa: E402

SEED = 0
PES = 64
CLOCK_MHZ = 800


def sparse_normal(density: float):
    """A weights(rng, shape) drawing exactly round(density * size) N(0, 1/kept fan-in) values."""
    def draw(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        w = np.zeros(int(np.prod(shape)), np.float32)
        k = max(1, round(density * w.size))
        fan_in = shape[0] if len(shape) == 2 else shape[-1]  # MatMul [in, out]; LSTM [dirs, gates, in]
        w[random_positions(rng, w.size, k)] = rng.standard_normal(k).astype(np.float32) / np.sqrt(density * fan_in)
        return w.reshape(shape)
    return draw


def models(density: float, tokens: int, steps: int) -> dict[str, tuple[onnx.ModelProto, str]]:
    """name -> (model, what one row of its segments is)."""
    w = sparse_normal(density)
    block = dict(tokens=tokens, d_model=256, heads=4, ffn=1024, fused_qkv=False, seed=SEED, weights=w)
    return {"encoder block": (transformer_block(**block), "token"),
            "decoder block": (transformer_block(decoder=True, **block), "token"),
            "LSTM (NT-LSTM size)": (recurrent("LSTM", steps=steps, inputs=600, hidden=600, seed=SEED, weights=w,
                                              head=False), "time step")}


def measure(name: str, model: onnx.ModelProto, unit: str, workdir: str, rows: int) -> dict:
    stem = os.path.join(workdir, name.split()[0])
    onnx.save(model, stem + ".onnx")
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(SEED)
    np.savez(stem + ".calib.npz", x=rng.standard_normal((8, *shape[1:])).astype(np.float32))
    x = rng.standard_normal((rows, *shape[1:])).astype(np.float32)
    np.savez(stem + ".test.npz", x=x)
    with open(stem + ".recipe.yaml", "w") as f:
        yaml.safe_dump({"target": {"pes": PES, "clock_mhz": CLOCK_MHZ}, "defaults": {"density": "keep", "bits": 4}}, f)
    res = compile_model(stem + ".onnx", stem + ".eie", stem + ".recipe.yaml", stem + ".calib.npz", seed=SEED)
    checked = validate(stem + ".onnx", stem + ".eie", stem + ".test.npz")
    sess = InferenceSession(stem + ".eie")
    sess.run(None, {"x": x[:1]})
    report = sess.last_report
    layers = [{"name": l["name"], "cycles": l["cycles"], "load_balance": l["load_balance"],
               "padding_entries": l["padding_entries"], "entries": l["entries"]} for l in report["layers"]]
    cycles = sum(l["cycles"] for l in layers)
    ort = ort_session(model)
    median, fastest = seconds(lambda: ort.run(None, {"x": x[:1]}), repeats=20)
    m = res.manifest
    return {
        "model": name, "unit": unit, "layers": layers,
        "weights": int(sum(np.prod(l["shape"]) for l in m["layers"] if not l.get("on_host"))),
        "host_ops": [h["name"] for h in m["host_ops"]],
        "compression_ratio_fixed": m["compression_ratio"], "compression_ratio_huffman": m.get("compression_ratio_huffman"),
        "cycles_per_unit": cycles, "latency_us_per_unit": cycles / CLOCK_MHZ,
        "load_balance": sum(l["load_balance"] * l["cycles"] for l in layers) / max(cycles, 1),
        "units_per_input": int(shape[1]),
        "exact": checked["exact"]["ok"],
        "rel_l2_error": {k: v["rel_l2_error"] for k, v in checked["fidelity"]["outputs"].items()},
        "inputs": rows,
        "onnxruntime_dense_ms_per_input": {"median": 1e3 * median, "fastest": 1e3 * fastest},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, default=4, help="test inputs (sequences) for the error figures")
    ap.add_argument("--out", default=os.path.join(RESULTS, "transformer.json"))
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, (model, unit) in models(args.density, args.tokens, args.steps).items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            results.append(measure(name, model, unit, workdir, args.rows))
    print(f"{'model':22} {'weights':>9} {'fixed':>6} {'huffman':>7} {'cycles':>9} {'per':10} {'us/unit':>8} "
          f"{'balance':>7} {'rel L2':>8} {'exact':>5} {'ORT ms':>7}")
    for r in results:
        err = max(r["rel_l2_error"].values())
        print(f"{r['model']:22} {r['weights']:>9} {r['compression_ratio_fixed']:>5.1f}x "
              f"{r['compression_ratio_huffman']:>6.1f}x {r['cycles_per_unit']:>9.0f} "
              f"{r['unit']:10} {r['latency_us_per_unit']:>8.2f} {r['load_balance']:>7.1%} {err:>8.1e} "
              f"{str(r['exact']):>5} {r['onnxruntime_dense_ms_per_input']['median']:>7.3f}")
        for l in r["layers"]:
            print(f"    {l['name']:18} {l['cycles']:>9.0f} cycles per {r['unit']}, load balance {l['load_balance']:.1%}")
    write_json(args.out, {"command": command_line(), "machine": machine_info(), "density": args.density,
                          "tokens": args.tokens, "steps": args.steps, "pes": PES, "clock_mhz": CLOCK_MHZ,
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
