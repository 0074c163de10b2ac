"""Benchmark: kt_paper's k-means against scikit-learn's `KMeans` (defaults: k-means++ init, one run), same data, same run.

Data: 100,000 float32 points in 256 dimensions drawn around 2,000 random centres (unit-variance centres, per-dimension
noise sigma=1), k = 1,000, 20 Lloyd iterations each (ours: the first 10 on a 32-per-centre subsample, the library's
default warm start; its k-means++ products in the precision policy's dtype, bf16 on CPUs with bf16 units). Prints wall times and final objectives (sum of squared
distances to the nearest centroid, computed by the same function for all), then `speedup: X` and
`objective_ratio: Y` (ours / scikit-learn's), and `faiss_overhead: Z`: ours over bare `faiss.Kmeans` (random
initialisation, the same training subsample size and iterations), timed in the same run.
Targets: speedup >= 10 at objective_ratio <= 1.01, faiss_overhead <= 2.

Usage: python bench/kmeans.py [--n 100000] [--k 1000] [--backend auto|faiss|torch] [--also-random] [--smoke]
`--smoke`: 2,000 points in 16 dimensions, k = 20, 4 iterations, seconds; what `tests/test_bench.py` runs. Its numbers
mean nothing.
"""
import argparse, os, time
import numpy as np
from _common import cpu_name, smoke_defaults, SMOKE_HELP, SMOKE_NOTE

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=100_000); ap.add_argument('--d', type=int, default=256)
    ap.add_argument('--centres', type=int, default=2000); ap.add_argument('--k', type=int, default=1000)
    ap.add_argument('--niter', type=int, default=20); ap.add_argument('--sigma', type=float, default=1.0)
    ap.add_argument('--backend', default='auto'); ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--also-random', action='store_true', help="also time faiss with its random initialisation")
    ap.add_argument('--smoke', action='store_true', help=SMOKE_HELP)
    a = smoke_defaults(ap, dict(n=2000, d=16, centres=40, k=20, niter=4))
    if a.smoke: print(SMOKE_NOTE)
    from sklearn.cluster import KMeans
    from kt_paper.kmeans import kmeans, kmeans_objective, resolve_backend, seeding_dtype
    import torch
    print(f"machine: {cpu_name()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}; backend {resolve_backend(a.backend)}; "
          f"k-means++ products in {seeding_dtype('cpu') or torch.float32}")
    rng = np.random.default_rng(a.seed)
    centres = rng.standard_normal((a.centres, a.d)).astype(np.float32)
    x = (centres[rng.integers(0, a.centres, a.n)] + a.sigma * rng.standard_normal((a.n, a.d))).astype(np.float32)
    print(f"data: n={a.n} d={a.d} around {a.centres} centres (sigma={a.sigma}), k={a.k}, {a.niter} iterations")

    t = time.perf_counter()
    ours = kmeans(x, a.k, niter=a.niter, seed=a.seed, max_points_per_centroid=256, backend=a.backend)
    t_ours = time.perf_counter() - t
    o_ours = kmeans_objective(x, ours.centroids)
    print(f"ours ({ours.backend}, k-means++ on a subsample): {t_ours:.2f} s, objective {o_ours:.6g}")

    if a.also_random:
        t = time.perf_counter()
        r = kmeans(x, a.k, niter=a.niter, seed=a.seed, init='random', backend=a.backend)
        print(f"ours with random init: {time.perf_counter() - t:.2f} s, objective {kmeans_objective(x, r.centroids):.6g}")

    import faiss
    t = time.perf_counter()
    km = faiss.Kmeans(a.d, a.k, niter=a.niter, seed=a.seed, max_points_per_centroid=256, verbose=False)
    km.train(x)
    t_faiss = time.perf_counter() - t
    o_faiss = kmeans_objective(x, km.centroids)
    print(f"bare faiss.Kmeans (random init): {t_faiss:.2f} s, objective {o_faiss:.6g}")

    t = time.perf_counter()
    sk = KMeans(a.k, max_iter=a.niter, random_state=a.seed).fit(x)
    t_sk = time.perf_counter() - t
    o_sk = kmeans_objective(x, sk.cluster_centers_.astype(np.float32))
    print(f"scikit-learn KMeans (k-means++, n_init=1, lloyd): {t_sk:.2f} s, objective {o_sk:.6g} (its own inertia_ {sk.inertia_:.6g})")
    print(f"speedup: {t_sk / t_ours:.2f}")
    print(f"objective_ratio: {o_ours / o_sk:.4f}")
    print(f"faiss_overhead: {t_ours / t_faiss:.2f}")

if __name__ == '__main__': main()
