"DDP on CPU with gloo: two processes with batch 8 each must match one process with batch 16."
import os
from pathlib import Path
import torch
from kt_paper.core import load_checkpoint
from kt_paper.distributed import launch

TESTS = str(Path(__file__).parent)

def test_ddp_matches_single_process(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    env = dict(PYTHONPATH=os.pathsep.join([TESTS, os.environ.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1')
    r = launch('ddp_target:train', dict(out=str(tmp_path/'ddp.pth'), batch=16), nproc=2, env=env)
    assert r == dict(world=2, sampler_epochs=[0, 1])   # the DistributedSampler reshuffles every epoch
    launch('ddp_target:train', dict(out=str(tmp_path/'one.pth'), batch=16, sharded_reference=True), nproc=1)
    ddp, _ = load_checkpoint(tmp_path/'ddp.pth'); one, _ = load_checkpoint(tmp_path/'one.pth')
    assert ddp.keys() == one.keys()     # unwrapped: no 'module.' prefix
    for k in one: torch.testing.assert_close(ddp[k], one[k], atol=1e-5, rtol=1e-4)
    # and training really changed the weights (the comparison is not between two untouched initialisations)
    launch('ddp_target:train', dict(out=str(tmp_path/'zero.pth'), batch=16, epochs=0, sharded_reference=True), nproc=1)
    zero, _ = load_checkpoint(tmp_path/'zero.pth')
    assert not torch.allclose(zero['3.weight'], one['3.weight'])

def test_teardown_leaves_no_gloo_thread(tmp_path, monkeypatch):
    """After DDP training and the worker's teardown, the process group and its gloo threads are gone. A group kept alive
    (DDP imports `torch.distributed.nn.functional`, whose defaults bind `group.WORLD`) kept them running into interpreter
    shutdown, where a thread still releasing a finished all_gather's tensors needs the GIL: Python ends it inside a
    `noexcept` destructor and the process aborts ('terminate called without an active exception', rank 1, exit -6)."""
    monkeypatch.syspath_prepend(TESTS)
    env = dict(PYTHONPATH=os.pathsep.join([TESTS, os.environ.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1')
    r = launch('ddp_target:teardown_probe', dict(out=str(tmp_path/'ddp.pth')), nproc=2, env=env)
    assert r['world'] == 2 and r['released'], r
    assert r['gloo_threads'] == [], r   # the threads were joined before the interpreter shuts down

def test_failed_worker_reports(tmp_path):
    import pytest
    with pytest.raises(RuntimeError, match='failed'):
        launch('kt_paper.no_such_module:f', {}, nproc=2, env=dict(OMP_NUM_THREADS='1'))

def test_jigsaw_stage_under_ddp(tmp_path, monkeypatch):
    """The pretext stage runs in two gloo processes; rank 0 alone writes the teacher and its history. The configuration's
    batch is the global batch: each process takes half of it and the run takes the steps of one process."""
    monkeypatch.setenv('IN_TEST', '1')
    m = launch('kt_paper.pretext:run_pretext', dict(out=str(tmp_path), preset='test', seed=0), nproc=2,
               env=dict(OMP_NUM_THREADS='1', IN_TEST='1'))
    assert m['processes'] == 2 and 0 <= m['heldout_puzzle_acc'] <= 1
    from kt_paper.jigsaw import JIGSAW_PRESETS
    from kt_paper.pretext import jigsaw_epochs
    cfg = JIGSAW_PRESETS['test']
    epochs, steps = jigsaw_epochs(cfg, m['n_train'])
    assert m['batch_per_process'] == cfg.bs // 2 and m['steps_this_run'] == epochs*steps   # as one process of batch cfg.bs
    from kt_paper.pretext import load_jigsaw_net
    net = load_jigsaw_net(tmp_path/'jigsaw'/'jigsaw_cfn.pth')
    assert not any(k.startswith('module.') for k in net.state_dict())
    hist = (tmp_path/'jigsaw'/'history.csv').read_text().splitlines()
    assert len(hist) >= 2 and hist[0].startswith('epoch')
