"Tests of kt_paper.probes: pooled feature sizes, frozen trunks, linear and non-linear probes."
import json, pytest, torch
from dataclasses import replace
from kt_paper.student import synthetic_images, STUDENT_PRESETS
from kt_paper.nets import build_alexnet, CONV_LAYERS, layer_outputs
from kt_paper.train import DeviceNormalize, to_model_input
from kt_paper.probes import (PROBE_PRESETS, probe_grids, probe_dims, LinearProbes, nonlinear_probe_model,
                             probe_dls, run_linear_probes, run_nonlinear_probe, NL_LAYERS)

def test_paper_grids_and_dims():
    net = build_alexnet(1000, fc_dim=8)
    assert probe_grids(net) == dict(conv1=10, conv2=6, conv3=5, conv4=5, conv5=6)
    assert probe_dims(net) == dict(conv1=9600, conv2=9216, conv3=9600, conv4=9600, conv5=9216)

@pytest.mark.parametrize('preset,grids', [('tiny', (5, 3, 2, 2, 3)), ('small', (9, 6, 5, 5, 6)), ('test', (3, 2, 2, 2, 2))])
def test_grids_scale_with_input(preset, grids):
    net = build_alexnet(10, **{**STUDENT_PRESETS[preset].alexnet_args(), 'fc_dim': 8})
    assert tuple(probe_grids(net).values()) == grids
    probes = LinearProbes(net, 10).eval()
    x = torch.zeros(2, 3, net.args['input_size'], net.args['input_size'])
    with torch.no_grad(): acts = layer_outputs(probes.trunk, x)
    dims = probe_dims(net)
    for n, h in probes.heads.items():
        assert h[:2](acts[n]).shape == (2, dims[n])   # pooled + flattened = the documented size
        assert not h[2].affine                        # BN without affine parameters

def test_conv_activations_unknown_layer():
    with pytest.raises(KeyError, match='conv9'): layer_outputs(build_alexnet(2, width=0.125, fc_dim=8).features, torch.zeros(1, 3, 227, 227), ['conv9'])

@pytest.fixture(scope='module')
def toy():
    cfg = PROBE_PRESETS['test']
    (xi, yi), (xv, yv) = synthetic_images(96, cfg.resize), synthetic_images(48, cfg.resize, seed=1)
    return cfg, probe_dls((xi, yi), (xv, yv), cfg, num_workers=0)

def _net(cfg):
    torch.manual_seed(0)
    net = build_alexnet(2, width=0.125, bn=True, conv1_stride=2, input_size=cfg.crop)
    with torch.no_grad():  # non-trivial BN statistics, so that a change would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d): m.running_mean.uniform_(-.1, .1); m.running_var.uniform_(.5, 2)
    return net

def _same(a, b): return all(torch.equal(a[k], b[k]) for k in a)

def test_linear_probes_learn_and_leave_trunk_unchanged(toy):
    cfg, dls = toy
    net = _net(cfg); before = {k: v.clone() for k, v in net.state_dict().items()}
    res = run_linear_probes(net, dls, 2, replace(cfg, lin_epochs=2))
    assert set(res) == set(CONV_LAYERS) and max(res.values()) > 0.8
    assert _same(before, net.state_dict())

def test_linear_probes_do_not_touch_their_own_trunk(toy):
    cfg, dls = toy
    probes = LinearProbes(_net(cfg), 2)
    before = {k: v.clone() for k, v in probes.trunk.state_dict().items()}
    opt = torch.optim.SGD([p for p in probes.parameters() if p.requires_grad], lr=0.1)
    probes.train()
    assert not probes.trunk.training
    for x, y in dls.train:
        assert x.dtype == torch.uint8   # the loaders hand over uint8 crops; the device normalises them
        loss = sum(torch.nn.functional.cross_entropy(o, y) for o in probes(to_model_input(x))); opt.zero_grad(); loss.backward(); opt.step()
    assert _same(before, probes.trunk.state_dict())

@pytest.mark.parametrize('layer', ['conv2', 'fc6'])
def test_nonlinear_probe_model_freezes_below_and_reinits_above(toy, layer):
    cfg, _ = toy
    net = _net(cfg); pf = nonlinear_probe_model(net, layer, 5)
    m, sd, new = pf.model, net.state_dict(), pf.model.state_dict()
    cut = NL_LAYERS.index(layer)
    for n in NL_LAYERS:
        blk = getattr(m.features, n, None) or getattr(m.classifier, n)
        w = blk.conv.weight if n.startswith('conv') else blk.fc.weight
        key = (f'features.{n}.conv.weight' if n.startswith('conv') else f'classifier.{n}.fc.weight')
        if NL_LAYERS.index(n) <= cut: assert torch.equal(w, sd[key]) and not w.requires_grad
        else: assert not torch.equal(w, sd[key]) and w.requires_grad
    assert m.classifier.fc8.out_features == 5
    pf.train()
    assert not m.features.conv1.training and m.classifier.fc8.training

def test_nonlinear_probe_trains_and_leaves_frozen_unchanged(toy):
    cfg, dls = toy
    net = _net(cfg); before = {k: v.clone() for k, v in net.state_dict().items()}
    pf = nonlinear_probe_model(net, 'conv3', 2)
    frozen_before = {k: v.clone() for k, v in pf.model.features.state_dict().items() if k.split('.')[0] in ('conv1', 'conv2', 'conv3')}
    acc = run_nonlinear_probe(net, dls, 2, 'conv3', replace(cfg, nl_epochs=2))
    assert acc > 0.8
    assert _same(before, net.state_dict())
    # the same check on the probe's own copy, trained by hand through the Learner path
    from fastai.learner import Learner
    learn = Learner(dls, pf, loss_func=torch.nn.CrossEntropyLoss(), splitter=lambda m: [[p for p in m.parameters() if p.requires_grad]],
                    cbs=[DeviceNormalize()])   # `probe_dls` hand over uint8 crops
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.01)
    after = pf.model.features.state_dict()
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)
    assert not torch.equal(before['features.conv4.conv.weight'], after['conv4.conv.weight'])

# --- probe sets: which labelled sets the stage probes, and where they live
from pathlib import Path
from kt_paper.data import DATA_PRESETS, DataError
from kt_paper.probes import PROBE_ROLES, NONLINEAR_SETS, parse_probe_sets, probe_set_roots, probe_split

def test_parse_probe_sets():
    assert parse_probe_sets('objects,scenes') == ('objects', 'scenes')
    assert parse_probe_sets('scenes, objects,scenes') == ('scenes', 'objects')
    for bad in ('', ' , ', 'objects,places', 'imagenet'):
        with pytest.raises(ValueError, match='objects'): parse_probe_sets(bad)
    assert set(NONLINEAR_SETS) <= set(PROBE_ROLES)

def test_probe_set_roots_follow_data_roles(tmp_path, monkeypatch):
    monkeypatch.delenv('KT_PAPER_DATA', raising=False)
    roots = probe_set_roots(('objects', 'scenes'), DATA_PRESETS['paper'], tmp_path, check=False)
    assert roots == {'objects': tmp_path/'ILSVRC2012', 'scenes': tmp_path/'places205'}
    with pytest.raises(DataError, match='places205'): probe_set_roots(('scenes',), DATA_PRESETS['paper'], tmp_path)
    (tmp_path/'places205').mkdir()   # only the requested role is resolved and checked (ILSVRC2012 is absent)
    assert probe_set_roots(('scenes',), DATA_PRESETS['paper'], tmp_path) == {'scenes': tmp_path/'places205'}
    with pytest.raises(DataError, match='DATA_ROOT'): probe_set_roots(('objects',), DATA_PRESETS['paper'], None)
    assert probe_set_roots((), DATA_PRESETS['paper']) == {}

def test_probe_set_roots_small_preset_on_real_samples(shared_data):
    # the 'small' preset's VOC2012 role is built-in; resolving the probe sets must not need it
    roots = probe_set_roots(('objects', 'scenes'), DATA_PRESETS['small'], shared_data)
    assert roots == {'objects': shared_data/'imagenette2-mini', 'scenes': shared_data/'miniplaces-mini'}
    cfg = replace(PROBE_PRESETS['test'], cache_images=False)
    (tr, ytr), (va, yva), classes = probe_split(roots['scenes'], cfg)
    assert len(classes) == 100 and len(tr) == len(ytr) == 2000 and len(va) == len(yva) == 500
    assert sorted(set(ytr)) == list(range(100)) and all(Path(p).is_file() for p in tr[:5] + va[:5])

def test_probe_split_builtin_test_scale():
    roots = probe_set_roots(('objects', 'scenes'), DATA_PRESETS['test'])
    assert [p.name for p in roots.values()] == ['objects', 'scenes']
    cfg = PROBE_PRESETS['test']
    (x, y), (xv, yv), classes = probe_split(roots['scenes'], cfg)
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, cfg.resize, cfg.resize) and len(x) == len(y) > 0
    assert len(xv) == len(yv) > 0 and set(y) == set(yv) == set(range(len(classes)))

def test_run_probes_caches_by_checkpoint_content(tmp_path):
    "The stage reuses a result only for the same checkpoint bytes: a retrained student is probed again."
    from kt_paper.probes import run_probes, demo_students
    from kt_paper.nets import load_alexnet, save_alexnet
    sd = demo_students(tmp_path, 'test', seed=0, probe_sets='scenes')
    r1 = run_probes(tmp_path, 'test', seed=0, device='cpu', probe_sets='scenes', student_dir=sd, quiet=True)
    assert set(r1['linear']['scenes']) == {'random', 'supervised'} and r1['nonlinear'] == {}
    n_files = lambda: len(list((tmp_path/'probes'/'linear_scenes').glob('*.json')))
    assert n_files() == 2
    r2 = run_probes(tmp_path, 'test', seed=0, device='cpu', probe_sets='scenes', student_dir=sd, quiet=True)
    assert r2['linear'] == r1['linear'] and n_files() == 2          # reused
    m = load_alexnet(sd/'random'/'final.pth')
    with torch.no_grad(): m.features.conv1.conv.weight.mul_(-1)     # "retrained": other weights in the same file
    save_alexnet(m, sd/'random'/'final.pth')
    run_probes(tmp_path, 'test', seed=0, device='cpu', probe_sets='scenes', student_dir=sd, quiet=True)
    assert n_files() == 3                                            # the changed model was probed again


def test_run_probes_can_leave_the_ablation_students_out(tmp_path):
    "`ablation_students=False` (the medium preset) probes the paper's rows only and reports the k / domain students as skipped."
    import shutil
    from kt_paper.probes import run_probes, demo_students
    sd = demo_students(tmp_path, 'test', seed=0, probe_sets='scenes')
    for n in ('cc_jigsaw_k10', 'cc_jigsaw_scenes-objects'): shutil.copytree(sd/'random', sd/n)
    r = run_probes(tmp_path, 'test', seed=0, device='cpu', probe_sets='scenes', student_dir=sd, quiet=True,
                   ablation_students=False)
    assert set(r['linear']['scenes']) == {'random', 'supervised'}
    assert set(r['skipped']) == {'cc_jigsaw_k10', 'cc_jigsaw_scenes-objects'} and 'VOC07' in r['skipped']['cc_jigsaw_k10']
    r = run_probes(tmp_path, 'test', seed=0, device='cpu', probe_sets='scenes', student_dir=sd, quiet=True)   # default: all
    assert set(r['linear']['scenes']) == {'random', 'supervised', 'cc_jigsaw_k10', 'cc_jigsaw_scenes-objects'}


@pytest.fixture(scope='module')
def clustered_run(tmp_path_factory):
    "A `test`-preset run folder through the evaluation stage: HOG clusters, the CC+HOG student, Random, their probes."
    from kt_paper.teachers import run_teachers
    from kt_paper.clustering import run_clustering
    from kt_paper.student import run_student
    from kt_paper.probes import run_probes
    out = tmp_path_factory.mktemp('run')
    run_teachers(out, 'test', seed=0, device='cpu', train_jigsaw=False)
    run_clustering(out, 'test', seed=0, device='cpu', teachers='hog', ablation_ks=(), k=3)
    run_student(out, 'test', seed=0, device='cpu', cc_teachers='hog', quiet=True)
    run_probes(out, 'test', seed=0, device='cpu', probe_sets='objects', quiet=True)
    return out

def test_seed_spread_trains_the_key_rows_again_and_writes_the_noise(clustered_run, monkeypatch):
    """A second seed of the key rows on the same clusters: only those rows, new weights, and noise.json = the largest
    difference between the two seeds' linear-probe cells, which the claims scoreboard then reads; the images are
    decoded once for the second seed's students and probes."""
    import kt_paper.student as ks, kt_paper.probes as kp
    from kt_paper.probes import run_seed_spread
    from kt_paper.report import noise_of_run, collect_results, seed_spread, claims
    from kt_paper.core import load_json
    tmp_path, decoded = clustered_run, []
    orig = ks.decode_images
    for m in (ks, kp): monkeypatch.setattr(m, 'decode_images', lambda ps, r: decoded.append(len(ps)) or orig(ps, r))
    res = run_seed_spread(tmp_path, 'test', seed=0, device='cpu', quiet=True)   # SPREAD_ROWS: only HOG has clusters here
    assert len(decoded) == 2                                                      # train + val, once (was twice each)
    o2 = tmp_path/'seed1'
    assert sorted(p.name for p in (o2/'student').iterdir() if p.is_dir()) == ['cc_hog', 'random']   # no supervised / ablation rows
    w0, w1 = (torch.load(o/'student'/'cc_hog'/'final.pth', weights_only=True) for o in (tmp_path, o2))
    k = next(k for k in w0 if k.endswith('conv1.conv.weight'))
    assert not torch.equal(w0[k], w1[k])                                          # another seed, other weights
    assert load_json(o2/'student'/'cc_hog'/'metrics.json')['seed'] == 1
    a, b = ({t: r[0] for t, r in collect_results(o).items()} for o in (tmp_path, o2))
    assert res['points'] == round(seed_spread(a, b), 2) and res['seeds'] == [0, 1] and res['rows'] == ['Random', 'CC+HOG']
    assert set(res['cells']) == {f'{r}/conv{i}' for r in ('Random', 'CC+HOG') for i in range(1, 6)}
    assert max(abs(x - y) for x, y in res['cells'].values()) == pytest.approx(res['points'], abs=0.01)
    assert res['tables'] == {'linear_imagenet': res['points']} and 'Random, CC+HOG' in res['measure']
    assert noise_of_run(tmp_path) == {'linear_imagenet': res['points']} and load_json(tmp_path/'noise.json') == res
    rows = claims(a, 'test', noise_of_run(tmp_path))
    assert rows and not any(r['status'] == 'held (noise not measured)' and r['id'] in ('1', '2', '7') for r in rows)

def test_seed_spread_of_fewer_rows_compares_only_those(clustered_run):
    "The medium preset's kind of measure: only the rows named are compared (here Random alone), and noise.json says so."
    from kt_paper.probes import run_seed_spread
    res = run_seed_spread(clustered_run, 'test', seed=0, other_seed=2, device='cpu', quiet=True, rows=('random',))
    assert res['rows'] == ['Random'] and set(res['cells']) == {f'Random/conv{i}' for i in range(1, 6)}
    assert not (clustered_run/'seed2'/'student'/'cc_hog').exists()
    assert 'of Random: Random drawn again' in res['measure'] and 'the other rows were not re-seeded' in res['measure']

def test_seed_spread_leaves_out_rows_the_first_seed_did_not_probe(clustered_run):
    "A row with clusters but no first-seed probe (e.g. CC+Random-teacher outside `medium`) is not trained again: nothing to compare."
    from kt_paper.probes import run_seed_spread
    f = clustered_run/'probes'/'linear_objects.json'; saved = f.read_text()
    try:
        d = json.loads(saved); del d['top1']['cc_hog']; f.write_text(json.dumps(d))
        res = run_seed_spread(clustered_run, 'test', seed=0, other_seed=3, device='cpu', quiet=True, rows=('cc_hog', 'random'))
    finally: f.write_text(saved)
    assert res['rows'] == ['Random'] and not (clustered_run/'seed3'/'student'/'cc_hog').exists()

def test_medium_measures_its_noise_on_two_rows():
    from kt_paper.probes import PROBE_PRESETS
    assert PROBE_PRESETS['medium'].noise_rows == ('cc_jigsaw', 'random')
    assert not any(PROBE_PRESETS[p].noise_rows for p in ('test', 'tiny', 'small', 'paper'))

def test_probe_results_follow_the_code(tmp_path, monkeypatch):
    "A change in the code the probes run (their module or one it imports) probes the same checkpoint again."
    import kt_paper.probes as kp
    from kt_paper.probes import run_probes, demo_students
    sd = demo_students(tmp_path, 'test', seed=0, probe_sets='scenes')
    n_files = lambda: len(list((tmp_path/'probes'/'linear_scenes').glob('*.json')))
    run_probes(tmp_path, 'test', seed=0, device='cpu', probe_sets='scenes', student_dir=sd, quiet=True)
    assert n_files() == 2
    monkeypatch.setattr(kp, 'code_digest', lambda *m: 'edited')
    run_probes(tmp_path, 'test', seed=0, device='cpu', probe_sets='scenes', student_dir=sd, quiet=True)
    assert n_files() == 4
    run_probes(tmp_path, 'test', seed=0, device='cpu', probe_sets='scenes', student_dir=sd, quiet=True, noise_rows=('random',))
    assert n_files() == 4                                   # which rows measure the noise changes no probe

def test_nonlinear_probes_get_their_own_batch_and_the_json_records_the_recipe(tmp_path, monkeypatch):
    "`nl_bs`: the non-linear probes' loaders have their protocol's batch; each table's JSON records the config (for the captions)."
    import kt_paper.probes as kp
    from kt_paper.probes import run_probes, demo_students
    from kt_paper.core import load_json
    sd = demo_students(tmp_path, 'test', seed=0, probe_sets='objects')
    seen = []
    monkeypatch.setattr(kp, 'run_nonlinear_probe', lambda net, dls, *a, **k: seen.append(dls.train.batch_size) or 0.5)
    run_probes(tmp_path, 'test', seed=0, device='cpu', probe_sets='objects', student_dir=sd, quiet=True, nl_bs=8)
    assert seen and set(seen) == {8} and PROBE_PRESETS['test'].bs != 8
    cfg = load_json(tmp_path/'probes'/'nonlinear_objects.json')['config']
    assert (cfg['nl_bs'], cfg['bs'], cfg['nl_epochs']) == (8, PROBE_PRESETS['test'].bs, PROBE_PRESETS['test'].nl_epochs)
    from kt_paper.report import collect_results
    note = collect_results(tmp_path)['nonlinear_imagenet'][1]
    n = PROBE_PRESETS['test'].nl_epochs
    assert f"{n} epoch{'s' * (n != 1)} × batch 8" in note and '48-px random crops' in note, note

def test_paper_nonlinear_probes_follow_the_eccv_recognition_solver():
    "350K iterations of 256 images, lr x0.1 every 100K (solver_cfn_rec.prototxt) = 70 epochs of ImageNet, drops at 20/40/60."
    c = PROBE_PRESETS['paper']
    assert (c.nl_bs, c.nl_lr, c.nl_epochs, c.nl_milestones, c.bs) == (256, 0.01, 70, (20, 40, 60), 64)

def test_nonlinear_probes_follow_the_job_list(tmp_path):
    "`nl_models` (Table E's rows at `paper`): only the listed models get non-linear probes; every model keeps its linear ones."
    from kt_paper.probes import run_probes, demo_students
    sd = demo_students(tmp_path, 'test', seed=0, probe_sets='objects')
    r = run_probes(tmp_path, 'test', seed=0, device='cpu', probe_sets='objects', student_dir=sd, quiet=True, nl_models=('random',))
    assert set(r['linear']['objects']) == {'random', 'supervised'} and set(r['nonlinear']['objects']) == {'random'}
    assert PROBE_PRESETS['paper'].nl_models and not PROBE_PRESETS['paper'].ablation_students

def test_probe_loaders_uint8_and_pinned_for_cuda():
    cfg = PROBE_PRESETS['test']
    (xi, yi), (xv, yv) = synthetic_images(16, cfg.resize), synthetic_images(8, cfg.resize, seed=1)
    dls = probe_dls((xi, yi), (xv, yv), cfg, num_workers=0, device='cuda')   # the decision only: nothing goes to a GPU
    assert [dl.pin_memory for dl in dls.loaders] == [True, True]
    assert [dl.pin_memory for dl in probe_dls((xi, yi), (xv, yv), cfg, num_workers=0, device='cpu').loaders] == [False, False]
    assert next(iter(dls.valid))[0].dtype == torch.uint8
