"""The evaluation plots draw any result, including a bootstrap CI that excludes its estimate."""

from pairaug_ray.train.evaluate import plot_auc_bars


def test_auc_bars_with_a_ci_that_excludes_the_estimate():
    per = {"Cardiomegaly": {"auc": 0.70, "ci_low": 0.72, "ci_high": 0.90},   # small test set
           "Edema": {"auc": None, "ci_low": None, "ci_high": None}}
    png = plot_auc_bars({"classes": list(per), "models": {"m": {"zeroshot": {"classes": per}}}})
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
