#!/usr/bin/env python3
"""Unit test of report.py on synthetic evaluator files: python3 scripts/quality/test_report.py"""
import contextlib
import csv
import importlib.util
import io
import math
import os
import shutil
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

DECODE = 128
STARTS = (0, 1000)  # two windows, so blocks come from more than one window
LLAMA_NLL = 2.0


def llama_nll(start, step):
    # Varies by token so that the ppl is not trivially exp(const) while its mean stays exactly LLAMA_NLL.
    return LLAMA_NLL + (0.5 if step % 2 else -0.5)


def method_nll(shift):
    # A mean-zero wobble around a constant shift: delta is exactly exp(shift) - 1 and the CI has width.
    # The wobble alternates between 32-step blocks, so blocks differ (as the bootstrap resamples blocks).
    return lambda start, step: llama_nll(start, step) + shift + (0.02 if (step // 32) % 2 else -0.02)


def job_row(method, budget, ctx, profile="fp32", recall="", attended="", ms="10.00", kv="f32"):
    return [method, profile, budget, ctx, DECODE, "1.000000", "", recall, 0, 4, 64, len(STARTS), attended,
            "1.000e-03", "5.000e-03", "0.100", ms, kv, "off"]


def write_job(root, name, ctx, configs):
    """configs: (method, budget, nll(start, step), row kwargs); writes <name>.csv, .layers.csv, .nll.csv."""
    base = os.path.join(root, name)
    with open(base + ".csv", "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(report.JOB_COLS)
        for method, budget, nll, kw in configs:
            row = job_row(method, budget, ctx, **kw)
            ppl = math.exp(sum(nll(s, i) for s in STARTS for i in range(DECODE)) / (len(STARTS) * DECODE))
            row[5] = f"{ppl:.6f}"
            wr.writerow(row)
    with open(base + ".layers.csv", "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(report.LAYER_COLS)
        for method, budget, _, kw in configs:
            if kw.get("recall"):
                for layer in range(2):
                    wr.writerow([method, kw.get("profile", "fp32"), budget, ctx, DECODE, layer, kw["recall"], 10])
    with open(base + ".nll.csv", "w") as f:
        for method, budget, nll, _ in configs:
            for s in STARTS:
                for i in range(DECODE):
                    f.write(f"{method},{budget},{ctx},{s},{i},{nll(s, i):.9f}\n")


def build_study(root):
    """Context 256 in two jobs (llama in the first), context 512 in one."""
    write_job(root, "p256_j00", 256, [
        ("llama", "full", llama_nll, {}),
        ("quest", "1/32", method_nll(0.10), dict(recall="0.500000", attended="76.0")),
        ("quest", "1/16", method_nll(0.05), dict(recall="0.700000", attended="84.0")),
    ])
    write_job(root, "p256_j01", 256, [
        ("sikv_2+1", "1/32", method_nll(0.02), dict(profile="2+1", recall="0.900000", attended="80.0")),
        ("sikv_parity", "k=100", method_nll(0.30), dict(profile="parity")),
        ("dense", "full", method_nll(0.0), {}),
    ])
    write_job(root, "p512_j00", 512, [
        ("quest", "1/8", method_nll(-0.01), dict(recall="0.800000", attended="132.0")),
        ("llama", "full", llama_nll, {}),
    ])


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        result = fn(*args)
    return result, out.getvalue()


class ReportTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="report_test_")
        self.study = os.path.join(self.dir, "study")
        os.mkdir(self.study)
        build_study(self.study)

    def tearDown(self):
        shutil.rmtree(self.dir)

    def results(self, *dirs):
        args = report.parse(list(dirs or [self.study]))
        res, _ = quiet(report.run, args)
        return {(r["context"], r["method"], r["budget"]): r for r in res}

    def test_perplexity_and_delta_are_exact(self):
        res = self.results()
        llama = res[256, "llama", "full"]
        expect_ppl = math.exp(LLAMA_NLL)
        self.assertAlmostEqual(llama["perplexity"], expect_ppl, places=9)
        self.assertEqual(llama["delta"], 0.0)
        self.assertEqual(llama["scored_tokens"], len(STARTS) * DECODE)
        quest = res[256, "quest", "1/32"]
        self.assertAlmostEqual(quest["perplexity"], math.exp(LLAMA_NLL + 0.10), places=8)
        self.assertAlmostEqual(quest["dense_perplexity"], expect_ppl, places=9)
        self.assertAlmostEqual(quest["delta"], math.expm1(0.10), places=9)
        self.assertAlmostEqual(res[512, "quest", "1/8"]["delta"], math.expm1(-0.01), places=9)
        self.assertAlmostEqual(quest["recall"], 0.5)
        self.assertAlmostEqual(quest["attended_tokens"], 76.0)

    def test_ci_contains_the_estimate(self):
        for key, r in self.results().items():
            self.assertLessEqual(r["ci_low"], r["delta"] + 1e-12, key)
            self.assertLessEqual(r["delta"], r["ci_high"] + 1e-12, key)
            if key[1] != "llama":
                self.assertLess(r["ci_low"], r["ci_high"], key)
        a = report.block_bootstrap({(0, i): 0.1 + (0.05 if i % 5 else -0.2) for i in range(256)})
        self.assertEqual(a, report.block_bootstrap({(0, i): 0.1 + (0.05 if i % 5 else -0.2) for i in range(256)}))

    def test_outputs(self):
        out = os.path.join(self.dir, "out")
        os.mkdir(out)
        paths = {k: os.path.join(out, f"x.{k}") for k in ("csv", "layers", "png", "md")}
        rc, text = quiet(report.main, [self.study, "--results", paths["csv"], "--layers", paths["layers"],
                                       "--plot", paths["png"], "--markdown", paths["md"]])
        self.assertEqual(rc, 0)
        with open(paths["csv"]) as f:
            rows = list(csv.reader(f))
        self.assertEqual(rows[0], report.RESULT_COLS)
        order = [(r[3], r[0], r[2]) for r in rows[1:]]
        self.assertEqual(order, [("256", "llama", "full"), ("256", "dense", "full"), ("256", "quest", "1/32"),
                                 ("256", "quest", "1/16"), ("256", "sikv_parity", "k=100"),
                                 ("256", "sikv_2+1", "1/32"), ("512", "llama", "full"), ("512", "quest", "1/8")])
        quest = dict(zip(rows[0], rows[3]))
        self.assertEqual(quest["delta_pct"], f"{100 * math.expm1(0.10):.4f}")
        self.assertEqual(quest["scored_tokens"], str(len(STARTS) * DECODE))
        self.assertEqual(dict(zip(rows[0], rows[1]))["recall"], "")
        with open(paths["layers"]) as f:
            layers = list(csv.reader(f))
        self.assertEqual(layers[0], report.LAYER_OUT_COLS)
        self.assertEqual(len(layers) - 1, 2 * 4)
        self.assertIn("## Context 256", text)
        self.assertIn("| `sikv_parity` | parity | — | — | — |", text)
        self.assertIn("| `llama` | 7.3891 (reference) |", text.replace(" — |", ""))
        with open(paths["md"]) as f:
            self.assertEqual(f.read().strip(), text.strip())
        if importlib.util.find_spec("matplotlib") is None:
            print("matplotlib missing: plot not checked", file=sys.stderr)
        else:
            self.assertGreater(os.path.getsize(paths["png"]), 1000)
        # Outputs written into the study directory must not be read back as evaluator files.
        shutil.copy(paths["csv"], os.path.join(self.study, "results.csv"))
        shutil.copy(paths["layers"], os.path.join(self.study, "results.layers.csv"))
        self.assertEqual(len(self.results()), 8)

    def test_layers_are_samples_weighted(self):
        other = os.path.join(self.dir, "other")
        os.mkdir(other)
        with open(os.path.join(other, "a.layers.csv"), "w") as f:
            f.write(",".join(report.LAYER_COLS) + "\nquest,fp32,1/32,256,128,0,1.0,30\n")
        merged = report.read_layers([os.path.join(self.study, "p256_j00.layers.csv"),
                                     os.path.join(other, "a.layers.csv")])
        layer0 = [r for r in merged if (r["method"], r["budget"], r["layer"]) == ("quest", "1/32", 0)][0]
        self.assertEqual(layer0["samples"], 40)
        self.assertAlmostEqual(layer0["recall"], (0.5 * 10 + 1.0 * 30) / 40)

    def test_missing_llama_is_an_error(self):
        os.remove(os.path.join(self.study, "p256_j00.nll.csv"))
        os.remove(os.path.join(self.study, "p256_j00.csv"))
        with self.assertRaisesRegex(report.ReportError, "context 256 has no llama"):
            self.results()
        self.assertEqual(quiet(report.main, [self.study])[0], 1)

    def test_duplicate_config_is_an_error(self):
        copy = os.path.join(self.dir, "copy")
        os.mkdir(copy)
        for suffix in (".csv", ".layers.csv", ".nll.csv"):
            shutil.copy(os.path.join(self.study, "p512_j00" + suffix), os.path.join(copy, "again" + suffix))
        with self.assertRaisesRegex(report.ReportError, "appears twice"):
            self.results(self.study, copy)
        # The same directory named twice is the same files, not a duplicate.
        self.assertEqual(len(self.results(self.study, self.study + os.sep)), 8)

    def test_duplicate_csv_row_is_an_error(self):
        with open(os.path.join(self.study, "p512_j00.csv"), "a", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow(job_row("quest", "1/8", 512))
        with self.assertRaisesRegex(report.ReportError, "512: quest @ 1/8.*appears twice"):
            self.results()

    def test_tokens_must_match_llama(self):
        with open(os.path.join(self.study, "p512_j00.nll.csv")) as f:
            lines = f.readlines()
        with open(os.path.join(self.study, "p512_j00.nll.csv"), "w") as f:
            f.writelines(line for line in lines if not line.startswith("quest,1/8,512,1000,5,"))
        with self.assertRaisesRegex(report.ReportError, "not scored on llama's tokens.*window 1000 step 5"):
            self.results()

    def test_engine_settings_must_match_llama(self):
        write_job(self.study, "p512_j01", 512, [("sink_window", "1/8", method_nll(0.2), dict(kv="f16"))])
        with self.assertRaisesRegex(report.ReportError, "kv_cache f16, llama with f32"):
            self.results()


if __name__ == "__main__":
    unittest.main()
