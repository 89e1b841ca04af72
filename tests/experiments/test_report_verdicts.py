"""The report's statements of agreement with the paper follow the numbers (directions, intervals, noise)."""
from hyperloop_lm.experiments.report import ablation_verdicts, cosine_verdict, recipe_verdicts, verdicts


def cell(ppls, **extra):
    return [{"seed": s, "val": {"ppl": p}, **extra} for s, p in enumerate(ppls)]


def line(lines, start):
    (hit,) = [l for l in lines if l.startswith(start)]
    return hit


def test_table1_verdicts_use_the_paired_interval():
    cm = {"hyperloop": cell([100, 101, 102]), "transformer": cell([105, 106.5, 107]), "looped": cell([99, 103, 101])}
    out = verdicts(cm)
    assert "**agrees**" in line(out, "- ppl, hyperloop vs transformer")
    assert "inconclusive" in line(out, "- ppl, hyperloop vs looped")
    assert "**disagrees**" in line(out, "- ppl, transformer vs looped")


def test_ablation_verdicts_use_the_pooled_seed_spread():
    cm = {"hyperloop": cell([100.0, 101.0]), "looped": cell([90.0, 90.0]), "streams2": cell([100.5]), "hres_identity": cell([110.0]),
          "hc_every6": cell([95.0]), "middle1x6": cell([101.0])}
    out = ablation_verdicts(cm)
    # pooled over hyperloop and looped: std 0.5 per run, 2 degrees of freedom (t = 4.30)
    assert "std 0.50 ppl per run, 2 degrees of freedom" in out[0]
    # paper +0.03: within the paper's own noise, nothing to check
    assert "no direction to check" in line(out, "- streams2")
    # paper +0.21; ours 110 - 100.5 = +9.5 +- 4.30 * 0.5 * sqrt(1 + 1/2) = [+6.87, +12.13]: a one-seed cell gets an interval
    assert "+9.50 [+6.87, +12.13]" in line(out, "- hres_identity") and "**agrees**" in line(out, "- hres_identity")
    assert "**disagrees**" in line(out, "- hc_every6")  # paper +0.23, ours -5.5 [-8.1, -2.9]
    assert "inconclusive" in line(out, "- middle1x6")  # +0.5, within the interval
    assert not [l for l in out if l.startswith("- looped_lora")]  # cells not run: no line
    # two seeds each: -10.5 +- 4.30 * 0.5 * 1 = [-12.65, -8.35]; its own paired interval (df 1) would include 0
    assert "-10.50 [-12.65, -8.35]" in line(out, "- looped (") and "**disagrees**" in line(out, "- looped (")
    # the referee's uniform-looping question: an interval (the new cell joins the pooled spread: df 3), no verdict
    out = ablation_verdicts({**cm, "uniform_looped": cell([95.0, 95.0])})
    assert "+5.00 [+3.70, +6.30]" in line(out, "- uniform_looped") and "agrees" not in line(out, "- uniform_looped")


def test_ablation_verdicts_without_any_multi_seed_cell_give_directions_only():
    out = ablation_verdicts({"hyperloop": cell([100.0]), "hc_every6": cell([95.0]), "middle1x6": cell([101.0])})
    assert "directions only" in out[0]
    assert "**opposite direction** (one seed, no interval)" in line(out, "- hc_every6")
    assert "same direction (one seed, no interval)" in line(out, "- middle1x6")


def test_recipe_verdicts():
    cm = {"transformer_pytorch_lr4e-4": cell([110, 111]), "transformer_gpt2_lr0.0016": cell([100, 101]),
          "hyperloop_pytorch_lr4e-4": cell([112, 113.1]), "hyperloop_gpt2_lr0.0016": cell([100.5, 100.5])}
    out = recipe_verdicts(cm)
    assert "**agrees**" in line(out, "- transformer, GPT-2 init")  # -10 [.. ] vs paper -1.3 to -1.9
    assert "**disagrees**" in line(out, "- hyperloop vs transformer, PyTorch")  # ours +2.05, paper -0.25
    assert "a match" in line(out, "- hyperloop vs transformer, GPT-2").split("ours")[1]


def test_cosine_verdict():
    def analysed(cos):
        return cell([100], post={"analysis": {"cross_loop_cosine": {"0-1": cos, "1-2": cos}}})

    assert "**agrees**" in cosine_verdict({"hyperloop": analysed(0.8), "looped": analysed(0.9)})[0]
    assert "**disagrees**" in cosine_verdict({"hyperloop": analysed(0.95), "looped": analysed(0.9)})[0]
    assert cosine_verdict({"hyperloop": analysed(0.95)}) == []


def test_summary_gathers_verdicts_by_outcome_once_each():
    from hyperloop_lm.experiments.report import summary

    body = ["## table1 @ x", "- a: **agrees** (the interval excludes 0)", "- b: **disagrees**: the opposite order",
            "## ablations @ y", "- c: same direction (one seed)", "- d: inconclusive: the interval includes 0",
            "- e: **opposite direction** (one seed)", "- a: **agrees** (the interval excludes 0)", "| table | row |"]
    out = "\n".join(summary(body))
    assert out.count("[table1 @ x] a:") == 1 and "[ablations @ y] a:" not in out  # repeated line: listed once
    agrees, rest = out.split("**Disagrees** (2):")
    assert "**Agrees** (1):" in agrees and "[table1 @ x] b:" in rest and "[ablations @ y] e:" in rest
    assert "(no interval yet)** (1):" in rest and "**Not settled** (1):" in rest and "table | row" not in out
    assert summary(["## s", "| no verdicts |"]) == []
