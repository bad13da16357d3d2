"""The synthetic benchmark's paired comparison with the baseline (same seeds)."""

from __future__ import annotations

from fgvc.analysis.synthetic_bench import RunRow, paired_table


def test_paired_differences_mean_std_and_seeds_won():
    base = RunRow("synth_baseline", seeds=[0, 1, 2], top1=[0.80, 0.82, 0.78])
    gate = RunRow("synth_gate", seeds=[0, 1, 2], top1=[0.83, 0.81, 0.80])  # +3, -1, +2 points
    lines = paired_table([base, gate])
    row = next(line for line in lines if line.startswith("| `synth_gate`"))
    assert "+1.3 ± 2.1" in row and "2 of 3" in row and "+3.0 -1.0 +2.0" in row


def test_partial_method_is_paired_on_its_finished_seeds_only():
    base = RunRow("synth_baseline", seeds=[0, 1], top1=[0.80, 0.82])
    se = RunRow("synth_se", seeds=[1], top1=[0.81])
    row = next(line for line in paired_table([base, se]) if line.startswith("| `synth_se`"))
    assert "-1.0 ± 0.0" in row and "0 of 1" in row
    assert paired_table([se]) == []  # no baseline: no pairs


def test_a_resumed_run_is_reused_and_another_seed_is_not(tmp_path):
    from fgvc.analysis.synthetic_bench import recipe_difference
    from fgvc.config import load_recipe, to_yaml

    args = ["recipe=synth_baseline", "seed=0", f"output_dir={tmp_path}"]
    (tmp_path / "recipe.yaml").write_text(to_yaml(load_recipe([*args, "train.resume=auto"])))
    assert recipe_difference(tmp_path, args) is None  # continued from a checkpoint: the same run
    assert recipe_difference(tmp_path, [*args[:1], "seed=1", args[2]]) == ("seed", 0, 1)


def test_keys_the_arch_does_not_read_do_not_make_a_run_stale(tmp_path):
    """A plain classifier saved when model.dcn.pool defaulted to max is still the same run; a DCN is not."""
    from omegaconf import OmegaConf

    from fgvc.analysis.synthetic_bench import recipe_difference
    from fgvc.config import keys_unread_by, load_recipe, to_yaml

    assert set(keys_unread_by("classifier")) >= {"model.dcn", "train.dcn", "model.zoom"}
    assert "model.dcn" not in keys_unread_by("dcn")
    for recipe, stale in (("synth_baseline", False), ("synth_dcn", True)):
        args = [f"recipe={recipe}", "seed=0", f"output_dir={tmp_path}"]
        saved = OmegaConf.create(to_yaml(load_recipe(args)))
        saved.model.dcn.pool = "max"  # the schema's default before issue 14's redesign
        (tmp_path / "recipe.yaml").write_text(OmegaConf.to_yaml(saved))
        assert recipe_difference(tmp_path, args) == (("model.dcn.pool", "max", "avg") if stale else None)
