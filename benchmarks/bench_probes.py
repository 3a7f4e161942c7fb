"""Batched torch probes versus a plain scikit-learn loop, timed in one run on the same data.

Synthetic "hidden states": several hooks see the same latent class structure of several info
types through different random linear maps with different noise, like pooled activations of a
model at several depths. Both sides use the same seed splits, the same standardization rule and
the same objective (C = 1), so their accuracies should agree; the script prints fits per second,
the speed ratio and the largest accuracy difference.

    python benchmarks/bench_probes.py [--n 800] [--dim 576] [--device cpu] [--threads 1]

Both sides run at scikit-learn's default tolerance (1e-4) and at ours (1e-6, max-abs gradient).
--threads caps torch's and scikit-learn's (BLAS and OpenMP) thread pools alike (default 1: on a
small or shared machine one thread per process is faster than several; 0 keeps the defaults).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mcollapse.analysis.probes import ProbeSettings, run_probes

INFO_TYPES = {"emotion": 4, "acoustic": 10, "lexical": 20, "speaker": 40}
HOOK_NOISE = {"encoder_output": 0.6, "adapter_output": 1.0, "llm_layer_16": 1.6, "llm_final": 2.4}


def synthetic_activations(n: int, dim: int, seed: int) -> tuple[dict, dict]:
    """Hook features (n, dim) carrying every info type's class signal, plus the label lists."""
    rng = np.random.default_rng(seed)
    latent_dim = 48
    labels, signal = {}, np.zeros((n, latent_dim))
    for info_type, n_classes in INFO_TYPES.items():
        codes = rng.permutation(np.arange(n) % n_classes)  # balanced, >= 2 per class
        labels[info_type] = [f"{info_type}_{code}" for code in codes]
        signal += rng.normal(size=(n_classes, latent_dim))[codes] * 0.5
    features = {}
    for hook, noise in HOOK_NOISE.items():
        mixing = rng.normal(size=(latent_dim, dim)) / np.sqrt(latent_dim)
        anisotropic = rng.normal(size=(n, 16)) @ rng.normal(size=(16, dim)) * 0.5
        features[hook] = (
            signal @ mixing + anisotropic + noise * rng.normal(size=(n, dim))
        ).astype(np.float32)
    return features, labels


def sklearn_loop(features: dict, labels: dict, seeds: tuple[int, ...], tol: float):
    """The straightforward way: one StandardScaler + LogisticRegression per hook x type x seed."""
    accuracies, n_not_converged = {}, 0
    for info_type, label_list in labels.items():
        y = np.asarray(label_list)
        for hook, X in features.items():
            for seed in seeds:
                splitter = StratifiedShuffleSplit(n_splits=1, train_size=0.8, random_state=seed)
                train, test = next(splitter.split(X, y))
                scaler = StandardScaler().fit(X[train])
                model = LogisticRegression(C=1.0, max_iter=1000, tol=tol)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    model.fit(scaler.transform(X[train]), y[train])
                n_not_converged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
                accuracies[info_type, hook, seed] = model.score(scaler.transform(X[test]), y[test])
    return accuracies, n_not_converged


def batched_probes(features: dict, labels: dict, seeds: tuple[int, ...], tol: float, device: str):
    settings = ProbeSettings(C=1.0, tol=tol, seeds=seeds, device=device)
    accuracies, n_not_converged = {}, 0
    for info_type, label_list in labels.items():
        for hook, outcome in run_probes(features, label_list, settings).items():
            n_not_converged += outcome.n_not_converged
            for row in outcome.per_seed:
                accuracies[info_type, hook, row["seed"]] = row["accuracy"]
    return accuracies, n_not_converged


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def max_gap(first: dict, second: dict) -> float:
    return max(abs(first[key] - second[key]) for key in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=800)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="thread cap for both sides; 0 keeps the libraries' defaults")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)

    features, labels = synthetic_activations(args.n, args.dim, seed=0)
    seeds = ProbeSettings().seeds
    n_fits = len(features) * len(labels) * len(seeds)
    print(
        f"{len(features)} hooks x {len(labels)} info types (K = {list(INFO_TYPES.values())}) x "
        f"{len(seeds)} seeds = {n_fits} fits; n = {args.n}, d = {args.dim}, C = 1; "
        f"device {args.device}, torch threads {torch.get_num_threads()}"
    )
    # Warm-up on a slice so one-off start-up costs are billed to neither side.
    run_probes({"warmup": features["llm_final"][:200, :32]}, labels["emotion"][:200],
               ProbeSettings(device=args.device))

    results = {}
    for tol in (1e-4, 1e-6):  # scikit-learn's default, then ours
        results["sklearn", tol] = timed(sklearn_loop, features, labels, seeds, tol)
        results["ours", tol] = timed(batched_probes, features, labels, seeds, tol, args.device)

    print(f"{'':36}{'seconds':>9}{'fits/s':>9}{'not converged':>15}")
    for tol in (1e-4, 1e-6):
        for side, name in (("sklearn", "sklearn loop"), ("ours", "batched torch L-BFGS")):
            (_, failed), seconds = results[side, tol]
            print(f"{name + f' (tol {tol:g})':36}{seconds:9.2f}{n_fits / seconds:9.2f}{failed:>15}")
    for tol in (1e-4, 1e-6):
        (ours, _), ours_s = results["ours", tol]
        (reference, _), reference_s = results["sklearn", tol]
        print(f"tol {tol:g}: speed ratio (sklearn time / ours) {reference_s / ours_s:.2f}x, "
              f"max |accuracy difference| {max_gap(ours, reference):.4f}")
    (converged, _), _ = results["ours", 1e-6]
    (sklearn_default, _), _ = results["sklearn", 1e-4]
    print(f"max |accuracy difference| between tol 1e-4 and 1e-6 fits (scikit-learn): "
          f"{max_gap(results['sklearn', 1e-6][0][0], sklearn_default):.4f}")
    for info_type in labels:
        means = {hook: np.mean([converged[info_type, hook, s] for s in seeds]) for hook in features}
        print(f"  {info_type:9} K={INFO_TYPES[info_type]:<3} mean accuracy by hook: "
              + ", ".join(f"{hook} {value:.3f}" for hook, value in means.items()))


if __name__ == "__main__":
    main()
