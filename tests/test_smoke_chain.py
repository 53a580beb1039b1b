"""The tiny run builds, records lineage, and evaluates through the suite machinery."""

from posttrain.evaluate import Suite, SuiteTask, evaluate_model


def test_tiny_run_lineage(manifest):
    base, sft = manifest.stage("base"), manifest.stage("sft")
    assert base["status"] == "done" and sft["status"] == "done"
    assert sft["plan"]["refs"]["init"]["path"] == base["output_dir"]
    assert (manifest.resolve("sft") / "config.json").exists()
    assert (manifest.resolve("sft") / "posttrain_plan.json").exists()


def test_evaluate_model_figures(manifest):
    suite = Suite(name="t", n=2, k=2, max_new_tokens=16,
                  tasks=[SuiteTask(name="arith", task="arithmetic", n_prompts=8,
                                   difficulty={"digits": 1})])
    results, dumps = evaluate_model(str(manifest.resolve("sft")), suite, progress=False)
    m = results["arith"]
    assert m["n_prompts"] == 8 and m["n_samples"] == 2
    assert 0.0 <= m["pass@1"] <= m["pass@2"] <= 1.0
    assert len(dumps["arith"]) == 8 and len(dumps["arith"][0]["samples"]) == 2
