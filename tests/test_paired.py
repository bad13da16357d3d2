"""The synthetic benchmark's paired comparison with the baseline (same seeds)."""

from __future__ import annotations

from fgvc.bench.synthetic import RunRow, paired_table


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
    from fgvc.bench.synthetic import recipe_difference
    from fgvc.config import load_recipe, to_yaml

    args = ["recipe=synth_baseline", "seed=0", f"output_dir={tmp_path}"]
    (tmp_path / "recipe.yaml").write_text(to_yaml(load_recipe([*args, "train.resume=auto"])))
    assert recipe_difference(tmp_path, args) is None  # continued from a checkpoint: the same run
    assert recipe_difference(tmp_path, [*args[:1], "seed=1", args[2]]) == ("seed", 0, 1)


def test_keys_the_arch_does_not_read_do_not_make_a_run_stale(tmp_path):
    """A plain classifier saved when model.dcn.pool defaulted to max is still the same run; a DCN is not."""
    from omegaconf import OmegaConf

    from fgvc.bench.synthetic import recipe_difference
    from fgvc.config import keys_unread_by, load_recipe, to_yaml

    assert set(keys_unread_by("classifier")) >= {"model.dcn", "train.dcn", "model.zoom"}
    assert "model.dcn" not in keys_unread_by("dcn")
    for recipe, stale in (("synth_baseline", False), ("synth_dcn", True)):
        args = [f"recipe={recipe}", "seed=0", f"output_dir={tmp_path}"]
        saved = OmegaConf.create(to_yaml(load_recipe(args)))
        saved.model.dcn.pool = "max"  # the schema's default before issue 14's redesign
        (tmp_path / "recipe.yaml").write_text(OmegaConf.to_yaml(saved))
        assert recipe_difference(tmp_path, args) == (("model.dcn.pool", "max", "avg") if stale else None)


def test_each_prediction_of_a_multi_output_run_gets_its_own_table(tmp_path):
    """RA-CNN's per-scale test accuracies (metrics.json test.top1_scale*) reach the page, seed by seed."""
    import json

    from fgvc.bench.synthetic import write_outputs

    racnn = RunRow("synth_racnn")
    for seed, (fused, s0, s1) in enumerate([(0.86, 0.27, 0.74), (0.87, 0.49, 0.84)]):
        run = tmp_path / f"r{seed}"
        run.mkdir()
        run.joinpath("metrics.json").write_text(json.dumps({"train_time_s": 1.0, "test": {
            "top1": fused, "mean_class_acc": fused, "top1_scale0": s0, "top1_scale1": s1}}))
        racnn.add(seed, run)
    assert racnn.named == {"scale0": [0.27, 0.49], "scale1": [0.74, 0.84]}
    write_outputs([RunRow("synth_baseline", seeds=[0, 1], top1=[0.8, 0.8], mean_class=[0.8, 0.8], train_time=[1, 1]),
                   racnn], [], [0, 1], tmp_path, "commit x",
                  {("synth_racnn", 0): {"zoom2": 0.9, "zoom2 centred baseline": 0.5},
                   ("synth_racnn", 1): {"zoom2": 0.75, "zoom2 centred baseline": 0.25}}, "cmd")
    page = (tmp_path / "README.md").read_text()
    assert "| seed | final | scale0 | scale1 |" in page and "| 1 | 87.00 | 49.00 | 84.00 |" in page
    assert "| seed | zoom2 | zoom2 centred baseline |" in page  # the coverage of every seed, one row each
    assert "| 0 | 90.0% | 50.0% |" in page and "| 1 | 75.0% | 25.0% |" in page
    assert "Each prediction of synth_baseline" not in page
