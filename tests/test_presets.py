"""Presets, and the prune command's options built from PruneConfig's fields (issue 9, item 1)."""

import dataclasses
import json
import shutil

import pytest

import jaxprune
from jaxprune.prune import presets
from jaxprune.cli import build_parser, main
from jaxprune.cli.prune_options import resolve_config
from jaxprune.errors import UsageError
from jaxprune.prune import PruneConfig
from tests import tiny

FIELDS = [f.name for f in dataclasses.fields(PruneConfig)]

# PruneConfig's defaults before the presets existed: the paper's method. Rows of
# benchmarks/quality.py made with them must stay reproducible through `paper`.
OLD_DEFAULTS = dict(method="goa", heads="second-moment", tau=None, reconstruct=True, refit=False, intercept=False,
                    damping=1e-3, auto_damping=False, allocation="uniform", attn_sparsity=None, score_data="calib",
                    free_groups=False, compensate=False, batch_size=16, seed=0, shrink=0.0, min_keep=0.0, absorb=0.0,
                    # No text was joined by the model's own then; Self-Gen sampled a text per window, top-50.
                    selfgen_share=0.0, selfgen_windows_per_text=1, selfgen_top_k=50)


def _args(*argv):
  return build_parser().parse_args(["prune", "m", "--out", "o", *map(str, argv)])


def test_defaults_are_the_recommended_preset():
  assert PruneConfig() == PruneConfig.preset("recommended") and presets.PRESETS["recommended"] == {}
  rec = PruneConfig()
  # The recipe the README's results table calls recommended.
  assert (rec.method, rec.refit, rec.intercept, rec.damping, rec.attn_sparsity, rec.absorb) == (
      "goa-obs", True, True, 1e-5, 0.0, 0.5)
  # A text is joined by half as many windows of the model's own text, drawn as the data-free preset draws.
  assert (rec.selfgen_share, rec.selfgen_windows_per_text, rec.selfgen_top_k) == (0.5, 4, 0)
  assert PruneConfig.preset("recommended-uniform").absorb == 0.0


def test_paper_presets_are_the_old_defaults():
  assert PruneConfig.preset("paper") == PruneConfig(**OLD_DEFAULTS)
  assert PruneConfig.preset("paper-datafree") == PruneConfig(**{**OLD_DEFAULTS, "score_data": "random"})
  # The paper's Self-Gen samples every window as a text of its own from BOS, top-50.
  assert (PruneConfig.preset("paper-datafree").selfgen_windows_per_text,
          PruneConfig.preset("paper-datafree").selfgen_top_k) == (1, 50)
  rdf = PruneConfig.preset("recommended-datafree")
  assert (rdf.score_data, rdf.selfgen_windows_per_text, rdf.selfgen_top_k, rdf.min_keep, rdf.shrink, rdf.absorb) == (
      "calib", 4, 0, 0.5, 0.5, 1.0)
  # Generating is the data-free run's only data cost: eight calibration sets' worth by default.
  assert (rdf.selfgen_samples, PruneConfig.preset("paper-datafree").selfgen_samples) == (1024, 128)


@pytest.mark.parametrize("method", presets.BASELINE_METHODS)
def test_baselines_run_as_their_tools(method):
  c = PruneConfig.preset("baseline", method=method)
  assert not (c.reconstruct or c.refit or c.intercept)
  assert c.compensate == (method == "flap") and c.allocation == "uniform" and c.attn_sparsity is None
  # An option still wins.
  assert PruneConfig.preset("baseline", method=method, compensate=False, refit=True).refit
  assert not PruneConfig.preset("baseline", method=method, compensate=False).compensate


def test_every_baseline_method_is_a_criterion():
  from jaxprune import criteria
  assert set(presets.BASELINE_METHODS) <= set(criteria.names())


@pytest.mark.parametrize("call,msg", [
    (lambda: PruneConfig.preset("fast"), r"unknown preset 'fast'; available: recommended, recommended-uniform, recommended-datafree"),
    (lambda: PruneConfig.preset("paper", dampng=1e-3), r"unknown key 'dampng'; allowed: sparsity, method"),
    (lambda: PruneConfig.preset("baseline"), r"preset 'baseline' needs a method; pass one of flap"),
])
def test_bad_preset_requests_name_the_value_and_the_choices(call, msg):
  with pytest.raises(UsageError, match=msg):
    call()


def test_every_field_is_an_option_with_the_fields_help():
  actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["prune"]._actions}
  for f in dataclasses.fields(PruneConfig):
    assert f.name in actions, f.name
    assert f.metadata["help"] in actions[f.name].help
    assert actions[f.name].default is None  # unset, so that the preset decides


@pytest.mark.parametrize("argv,preset,expect", [
    (("--sparsity", 0.2, "--calib", "t.txt"), "recommended", dict(method="goa-obs", refit=True, damping=1e-5)),
    (("--sparsity", 0.2), "recommended-datafree", dict(method="goa-obs", score_data="calib")),
    (("--sparsity", 0.2, "--method", "flap", "--allocation", "adaptive"), "baseline",
     dict(method="flap", reconstruct=False, refit=False, intercept=False, compensate=True, allocation="adaptive")),
    (("--sparsity", 0.2, "--method", "wanda-sp", "--reconstruct"), "baseline",
     dict(reconstruct=True, compensate=False, refit=False)),
    (("--sparsity", 0.2, "--method", "goa"), "recommended-datafree", dict(method="goa", refit=True)),
    (("--sparsity", 0.2, "--preset", "paper", "--calib", "t.txt"), "paper", OLD_DEFAULTS),
    (("--sparsity", 0.5, "--preset", "paper-datafree", "--damping", "auto", "--layers", "1:3", "--seed", 4),
     "paper-datafree", dict(score_data="random", auto_damping=True, layers=(1, 3), seed=4, sparsity=0.5)),
])
def test_options_start_from_the_right_preset(argv, preset, expect):
  config, name = resolve_config(_args(*argv))
  assert name == preset
  for k, v in expect.items():
    assert getattr(config, k) == v, k


def test_precedence_is_preset_then_file_then_options(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("sparsity: 0.3\ndamping: 1.0e-2\nrefit: true\nlayers: [0, 1]\nallocation: adaptive\n")
  config, name = resolve_config(_args("--preset", "paper", "--config", path, "--damping", "1e-4"))
  assert name == "paper"
  assert (config.sparsity, config.damping, config.refit, config.layers, config.allocation) == (
      0.3, 1e-4, True, (0, 1), "adaptive")
  assert config.method == "goa" and not config.intercept  # from the preset
  # A method in the file picks the preset as on the command line.
  path.write_text("sparsity: 0.3\nmethod: flap\n")
  config, name = resolve_config(_args("--config", path))
  assert name == "baseline" and config.compensate and not config.reconstruct


@pytest.mark.parametrize("text,msg", [
    ("sparsity: 0.2\nalocation: uniform\n", r"unknown key 'alocation'; allowed: sparsity, method, heads"),
    ("sparsity: 0.2\nallocation: global\n", r"allocation='global' is not one of uniform, adaptive"),
    ("sparsity: lots\n", r"sparsity='lots' is not a number"),
    ("sparsity: 0.2\nrefit: maybe\n", r"refit='maybe' is not a boolean"),
    ("sparsity: 0.2\nlayers: 3\n", r"layers=3 is not a block range"),
    ("- sparsity\n", r"must hold a mapping of PruneConfig fields"),
    ("sparsity: [0.2\n", r"is not valid YAML"),
])
def test_bad_config_files_name_the_key_and_the_allowed_values(tmp_path, text, msg):
  path = tmp_path / "c.yaml"
  path.write_text(text)
  with pytest.raises(UsageError, match=msg):
    resolve_config(_args("--config", path))


def test_missing_sparsity_and_missing_file_are_clear_errors(tmp_path):
  with pytest.raises(UsageError, match="no sparsity given; pass --sparsity"):
    resolve_config(_args())
  with pytest.raises(UsageError, match="config file .*nope.yaml does not exist"):
    resolve_config(_args("--config", tmp_path / "nope.yaml"))


def test_prune_command_with_preset_and_config_file(capsys, tiny_dir, tmp_path):
  model = tiny.add_word_tokenizer(shutil.copytree(tiny_dir("llama_gqa"), tmp_path / "model"))
  calib = tiny.write_words(str(tmp_path / "calib.txt"), 600, seed=1)
  cfg = tmp_path / "c.yaml"
  cfg.write_text("sparsity: 0.3\nbatch_size: 8\nrefit: true\n")
  out = tmp_path / "out"
  code = main(["prune", str(model), "--preset", "paper", "--config", str(cfg), "--damping", "1e-2", "--calib", calib,
               "--calib-samples", "16", "--seq-len", "16", "--out", str(out)])
  assert code == 0, capsys.readouterr().err
  report = json.loads((out / "report.json").read_text())
  assert report["preset"] == "paper"
  c = report["config"]
  assert (c["method"], c["sparsity"], c["refit"], c["damping"], c["batch_size"]) == ("goa", 0.3, True, 1e-2, 8)
  # Uniform allocation: one shape in every layer, loadable as a plain config.
  pruned = jaxprune.load(str(out))
  assert len({(l.num_heads, l.num_kv_heads, l.ffn_dim) for l in pruned.spec.layers}) == 1
  assert "per_layer_config" not in json.loads((out / "config.json").read_text())


def test_every_benchmark_row_is_a_valid_config():
  """The rows of benchmarks/quality.py and benchmarks/selection.py name presets and fields
  that exist, so a renamed field cannot silently drop out of the evidence."""
  import importlib.util
  import os
  import sys
  bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
  sys.path.insert(0, bench)
  try:
    mods = []
    for name in ("quality", "selection"):
      spec = importlib.util.spec_from_file_location(name, os.path.join(bench, f"{name}.py"))
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      mods.append(mod)
  finally:
    sys.path.remove(bench)
  quality, selection = mods
  for name, preset, kwargs, source in quality.RUNS + selection.CANDIDATES:
    assert source in ("valid", "random", "selfgen", "valid+selfgen"), name
    if kwargs is None:
      continue
    for ratio in (0.2, 0.5):
      kw = quality.resolve(kwargs, ratio)
      if kw is not None:
        PruneConfig.preset(preset, **{"sparsity": ratio, **kw})
  names = [c[0] for c in selection.CANDIDATES]
  assert len(names) == len(set(names))
