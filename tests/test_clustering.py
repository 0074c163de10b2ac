"Tests of kt_paper.clustering: k-means backends, seeding, pseudo-labels, cross-dataset labelling, diagnostics."
import numpy as np, pytest
from sklearn.metrics import normalized_mutual_info_score as nmi
from kt_paper import clustering as C, kmeans as K
from kt_paper.clustering import ClusterConfig, fit_clusters, label_with_clusters, load_pseudo_labels, cluster_diagnostics
from kt_paper.kmeans import make_blobs, kmeans, assign, kmeans_objective, fit_preprocessing, apply_preprocessing, Preprocessing

needs_faiss = pytest.mark.skipif(not K.HAVE_FAISS, reason='faiss not installed')

@pytest.mark.parametrize('backend', [pytest.param('faiss', marks=needs_faiss), 'torch'])
def test_blobs_recovered(backend):
    x, y = make_blobs(3000, 12, 24, spread=0.05, seed=1)
    r = kmeans(x, 12, niter=10, seed=0, backend=backend, device='cpu')
    assert nmi(y, assign(x, r.centroids)[0]) > 0.999
    assert r.centroids.shape == (12, 24) and r.centroids.dtype == np.float32

def test_stable_for_fixed_seed():
    x, _ = make_blobs(2000, 30, 16, spread=0.5, seed=2)
    a = assign(x, kmeans(x, 20, seed=5).centroids)[0]
    b = assign(x, kmeans(x, 20, seed=5).centroids)[0]
    np.testing.assert_array_equal(a, b)

@needs_faiss
def test_torch_fallback_matches_faiss_objective():
    # overlapping groups (more groups than clusters): the objective depends on the optimisation, not just the data
    x, _ = make_blobs(6000, 80, 32, spread=0.6, seed=3)
    f = kmeans(x, 40, niter=20, seed=0, backend='faiss')
    t = kmeans(x, 40, niter=20, seed=0, backend='torch', device='cpu')
    assert abs(t.objective / f.objective - 1) < 0.01, (t.objective, f.objective)
    # and the reported objective is the one computed independently
    assert np.isclose(f.objective, kmeans_objective(x, f.centroids, 'torch'), rtol=1e-4)

@needs_faiss
def test_kmeanspp_beats_random_init():
    x, _ = make_blobs(8000, 200, 32, spread=0.7, seed=4)
    pp = kmeans(x, 100, niter=10, seed=0, init='kmeans++').objective
    rnd = kmeans(x, 100, niter=10, seed=0, init='random').objective
    assert pp < rnd

def test_empty_clusters_are_resplit():
    # 5 distinct points, 5 clusters, initialised with 4 copies of one point: the empty ones must be re-seeded
    x = np.repeat(np.eye(5, dtype=np.float32) * 10, 20, axis=0)
    init = np.stack([x[0]] * 4 + [x[-1]])
    c, nsplit = K.torch_lloyd(x, init, niter=10, device='cpu')
    assert nsplit > 0
    assert len(np.unique(c.round(6), axis=0)) == 5  # no duplicated centres left behind

def test_preprocessing_roundtrip(tmp_path):
    x, _ = make_blobs(500, 5, 20, seed=0)
    pp = fit_preprocessing(x, 8, whiten=True, l2=True)
    y = apply_preprocessing(pp, x, chunk=100)
    assert y.shape == (500, 8)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, rtol=1e-5)
    pp.save(tmp_path/'pp.npz')
    np.testing.assert_array_equal(apply_preprocessing(Preprocessing.load(tmp_path/'pp.npz'), x, chunk=100), y)

def test_cross_dataset_labelling(tmp_path):
    # "ImageNet" and "Places" share the same 6 underlying groups; centres from one label the other, and the reverse
    x, y = make_blobs(1600, 6, 16, spread=0.1, seed=7)
    a, ya, b, yb = x[:800], y[:800], x[800:], y[800:]
    cfg = ClusterConfig(k=6, pca_dim=8, niter=10)
    fit_clusters(a, cfg, tmp_path/'A', seed=0)
    fit_clusters(b, cfg, tmp_path/'B', seed=0)
    dab = label_with_clusters(tmp_path/'A', b, [f'b{i}' for i in range(800)], tmp_path/'A'/'b.csv', yb)
    dba = label_with_clusters(tmp_path/'B', a, [f'a{i}' for i in range(800)], tmp_path/'B'/'a.csv', ya)
    assert dab['nmi'] > 0.99 and dba['nmi'] > 0.99
    pl = load_pseudo_labels(tmp_path/'A'/'b.csv')
    assert pl.ids[:2] == ['b0', 'b1'] and len(pl.labels) == 800 and pl.labels.max() < 6
    with pytest.raises(ValueError, match='dimension'): label_with_clusters(tmp_path/'A', b[:, :3], ['x']*800, tmp_path/'x.csv')

def test_diagnostics_counts():
    d = cluster_diagnostics(np.array([0]*90 + [1]*9 + [3]), 4, true_labels=np.array([0]*89 + [1]*11), tiny_frac=0.5)
    assert (d['n_empty'], d['n_tiny'], d['size_max']) == (1, 2, 90)
    assert d['purity'] == 0.99 and 0 < d['nmi'] < 1
    assert 'nmi' not in cluster_diagnostics(np.zeros(5, int), 2, true_labels=-np.ones(5, int))

def test_bad_inputs():
    x, _ = make_blobs(10, 2, 4)
    with pytest.raises(ValueError, match='only 10 points'): kmeans(x, 11)
    with pytest.raises(ValueError, match='unknown k-means backend'): kmeans(x, 2, backend='sklearn')
    with pytest.raises(ValueError, match='header'):
        import tempfile, pathlib
        p = pathlib.Path(tempfile.mkdtemp())/'bad.csv'; p.write_text('a,b\n1,2\n'); load_pseudo_labels(p)

def test_stage_on_extracted_features(tmp_path):
    "cluster_teacher_features: features written by teachers.extract_features -> pseudo-label CSVs with diagnostics."
    from PIL import Image
    from kt_paper.teachers import HOGTeacher, extract_features
    from kt_paper.clustering import cluster_teacher_features
    rng = np.random.default_rng(0)
    for split, n in (('train', 12), ('val', 4)):
        paths, labels = [], []
        for i in range(n):
            c = i % 2; p = tmp_path/'data'/split/f'c{c}'/f'{i}.png'; p.parent.mkdir(parents=True, exist_ok=True)
            a = np.zeros((32, 32), np.uint8); a[:, ::4] = 255                 # class 0: vertical stripes
            if c: a = a.T.copy()                                               # class 1: horizontal stripes
            a = np.clip(a.astype(int) + rng.integers(0, 40, a.shape), 0, 255).astype(np.uint8)
            Image.fromarray(a).convert('RGB').save(p); paths.append(p); labels.append(c)
        extract_features(HOGTeacher(32, 8, 2, 9), paths, tmp_path/'feat'/f'objects_{split}.npy', root=tmp_path/'data',
                         labels=labels, batch_size=5, num_workers=0)
    r = cluster_teacher_features(tmp_path/'feat', ClusterConfig(k=2, pca_dim=4, niter=10), tmp_path/'cl')
    d = r['diagnostics']
    assert set(d) == {'objects_train', 'objects_val'} and d['objects_val']['nmi'] > 0.99
    pl = load_pseudo_labels(r['cluster_dir']/'pseudo_labels_objects_val.csv')
    assert pl.ids[0] == 'val/c0/0.png' and len(pl.labels) == 4
    assert (r['cluster_dir']/'diagnostics.json').exists() and (r['cluster_dir']/'centroids.npy').exists()

def test_k_ablation_one_folder_per_k(tmp_path):
    "cluster_k_ablation: one clustering per k (with the preset's other settings), each labelling both splits; reruns reuse them."
    from kt_paper.core import save_json
    from kt_paper.clustering import cluster_k_ablation, ABLATION_KS
    assert set(ABLATION_KS) == {'test', 'tiny', 'small', 'medium', 'paper'} and ABLATION_KS['paper'] == (500, 1000, 5000, 10000)
    x, y = make_blobs(300, 6, 16, seed=0)
    fd = tmp_path/'feat'; fd.mkdir()
    for name, sl in (('objects_train', slice(0, 240)), ('objects_val', slice(240, 300))):
        np.save(fd/f'{name}.npy', x[sl])
        save_json(dict(shape=list(x[sl].shape), ids=[f'{name}/{i}' for i in range(len(x[sl]))], labels=y[sl].tolist(),
                       fingerprint=name), fd/f'{name}.json')
    cfg = ClusterConfig(k=40, pca_dim=8, niter=10)
    r = cluster_k_ablation(fd, cfg, (3, 6), tmp_path/'abl')
    assert sorted(r) == [3, 6]
    assert [r[k]['diagnostics']['objects_val']['k'] for k in (3, 6)] == [3, 6]
    assert sorted(p.name.split('-')[1] for p in (tmp_path/'abl').iterdir() if p.is_dir()) == ['k3', 'k6']
    assert r[6]['diagnostics']['objects_val']['nmi'] > 0.99
    mt = (r[6]['cluster_dir']/'centroids.npy').stat().st_mtime_ns
    assert cluster_k_ablation(fd, cfg, (6,), tmp_path/'abl')[6]['cluster_dir'] == r[6]['cluster_dir']
    assert (r[6]['cluster_dir']/'centroids.npy').stat().st_mtime_ns == mt   # the fitted model is reused

@pytest.fixture(scope='module')
def teacher_run(tmp_path_factory):
    "A run folder holding the test preset's teacher features (HOG and the random trunk)."
    from kt_paper.teachers import run_teachers
    out = tmp_path_factory.mktemp('run')
    return out, run_teachers(out, 'test', seed=0, device='cpu', num_workers=0)

def test_run_clustering_stage(teacher_run, tmp_path):
    "run_clustering (test preset): both directions per teacher, pseudo-labels where the student reads them, the k ablation, grids; full reuse."
    import shutil
    from kt_paper.teachers import load_features
    src, feats = teacher_run
    out = tmp_path/'run'; shutil.copytree(src/'features', out/'features')
    r = C.run_clustering(out, 'test', seed=0, device='cpu', ablation_teacher='hog', fig_dir=tmp_path/'fig')
    k = C.CLUSTER_PRESETS['test'].k
    assert sorted(r['clusters']) == ['hog', 'random'] and r['skipped'] == {} and r['pruned'] == []
    for t, c in r['clusters'].items():
        assert sorted(c) == ['objects_train', 'scenes_train']
        for train, res in c.items():
            cd = res['cluster_dir']
            assert cd.parent == out/'clusters'/t and cd.name.startswith(f'{train}-k{k}-') and not res['reused']
            assert sorted(res['diagnostics']) == ['objects_train', 'objects_val', 'scenes_train', 'scenes_val']
            for name in res['diagnostics']:
                pl = load_pseudo_labels(cd/f'pseudo_labels_{name}.csv')
                assert pl.ids == load_features(feats['teachers'][t]['files'][name])[1]['ids']
                assert 0 <= pl.labels.min() and pl.labels.max() < k
    assert [p.name for p in r['figures']] == ['clusters_hog.png', 'clusters_random.png'] and all(p.exists() for p in r['figures'])
    assert sorted(r['ablation']) == list(C.ABLATION_KS['test'])
    assert r['ablation'][4]['cluster_dir'].parent == out/'ablation_clusters'/'hog'
    csvs = sorted((out/'clusters').rglob('*.csv')) + sorted((out/'ablation_clusters').rglob('*.csv'))
    mtimes = [f.stat().st_mtime_ns for f in csvs]
    r2 = C.run_clustering(out, 'test', seed=0, device='cpu', ablation_teacher='hog', fig_dir=tmp_path/'fig')
    assert all(res['reused'] for c in r2['clusters'].values() for res in c.values()) and r2['ablation'][4]['reused']
    assert [f.stat().st_mtime_ns for f in csvs] == mtimes and r2['pruned'] == []     # nothing recomputed or removed
    assert r2['clusters']['hog']['objects_train']['diagnostics'] == r['clusters']['hog']['objects_train']['diagnostics']

def test_run_clustering_recomputes_on_new_features_or_settings(teacher_run, tmp_path):
    "New teacher features, another seed or k: new clusterings, and the superseded ones are removed (the student globs these folders)."
    import shutil
    from kt_paper.teachers import run_teachers
    src, _ = teacher_run
    out = tmp_path/'run'; shutil.copytree(src/'features', out/'features')
    run = lambda **kw: C.run_clustering(out, 'test', device='cpu', ablation_ks=(), fig_dir=tmp_path/'fig', **{'seed': 0, **kw})
    folders = lambda t: sorted(p.name for p in (out/'clusters'/t).iterdir() if p.is_dir())
    r = run()
    hog0, rnd0 = r['clusters']['hog']['objects_train']['cluster_dir'], r['clusters']['random']['objects_train']['cluster_dir']
    run_teachers(out, 'test', seed=0, device='cpu', num_workers=0, hog_cell=16)  # a changed HOG teacher: new HOG features only
    r2 = run()
    hog1 = r2['clusters']['hog']['objects_train']['cluster_dir']
    assert hog1 != hog0 and not r2['clusters']['hog']['objects_train']['reused'] and not hog0.exists()
    assert r2['clusters']['random']['objects_train']['cluster_dir'] == rnd0 and r2['clusters']['random']['objects_train']['reused']
    assert len(folders('hog')) == 2 and sorted(map(str, r2['pruned'])) == sorted(str(out/'clusters'/'hog'/n) for n in
                                                                                  [hog0.name, r['clusters']['hog']['scenes_train']['cluster_dir'].name])
    r3 = run(seed=1, teachers='hog')
    assert r3['clusters']['hog']['objects_train']['cluster_dir'] != hog1 and list(r3['clusters']) == ['hog']
    r4 = run(seed=1, teachers='hog', k=6)
    assert [n.split('-')[1] for n in folders('hog')] == ['k6', 'k6']
    assert r4['clusters']['hog']['objects_train']['diagnostics']['objects_val']['k'] == 6
    assert folders('random') == sorted([rnd0.name, r['clusters']['random']['scenes_train']['cluster_dir'].name])  # untouched

def test_run_clustering_skips_missing_features(tmp_path):
    r = C.run_clustering(tmp_path, 'test', device='cpu', teachers='jigsaw')
    assert r['clusters'] == {} and 'jigsaw' in r['skipped'] and 'ablation:jigsaw' in r['skipped']
    assert C.stage_teacher_names(tmp_path/'features') == []
