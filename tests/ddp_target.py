"A tiny training function used by tests/test_distributed.py under torchrun (importable via PYTHONPATH=tests)."
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, DistributedSampler
from fastai.learner import Learner
from kt_paper.train import sgd as SGD   # the project's foreach-stepped fastai SGD
from fastai.data.core import DataLoaders
import fastai.callback.progress  # Learner.no_bar
from kt_paper.core import seed_everything, save_checkpoint
from kt_paper.distributed import DistributedCallback, is_main_process, world_info

def train(out:str, batch:int=16, epochs:int=2, seed:int=0, sharded_reference:bool=False):
    "Train a small conv net on fixed random data; rank 0 saves the weights to `out`."
    seed_everything(seed)
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    ds = TensorDataset(x, y)
    rank, _, world = world_info()
    if sharded_reference:   # one process, but the same epoch order as DistributedSampler (for an exact comparison)
        train_dl = DataLoader(ds, batch_size=batch, sampler=DistributedSampler(ds, 1, 0, shuffle=True, seed=seed, drop_last=True), drop_last=True)
    else: train_dl = DataLoader(ds, batch_size=batch // world, shuffle=True, drop_last=True)
    dls = DataLoaders(train_dl, DataLoader(ds, batch_size=32))
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8*6*6, 4))
    learn = Learner(dls, net, loss_func=nn.CrossEntropyLoss(), opt_func=SGD, lr=0.1,
                    cbs=[DistributedCallback(seed=seed)] if world > 1 else [])
    if sharded_reference: learn.add_cb(_SetEpoch())
    rec = _RecordEpochs(); learn.add_cb(rec)
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, lr=0.1)
    if is_main_process(): save_checkpoint(learn.model, out)
    return dict(world=world, sampler_epochs=rec.seen)

from fastai.callback.core import Callback
class _SetEpoch(Callback):
    def before_train(self): self.learn.dls.loaders[0].sampler.set_epoch(self.epoch)

class _RecordEpochs(Callback):
    "Record the epoch of the training sampler during each training phase (each epoch must reshuffle)."
    order = 0
    def before_fit(self): self.seen = []
    def after_train(self): self.seen.append(getattr(self.learn.dls.loaders[0].sampler, 'epoch', None))

def teardown_probe(out:str) -> dict:
    """Train as `train` does (DDP, and fastai's `dist.all_gather` of every validation batch), tear the process group
    down as the torchrun worker does, and report what is left of it."""
    from pathlib import Path
    from kt_paper.distributed import _teardown
    res = train(out)
    released = _teardown()
    tasks = Path('/proc/self/task')   # Linux: one entry per thread, named by its `comm`
    threads = [(t/'comm').read_text().strip() for t in tasks.iterdir()] if tasks.is_dir() else []
    return dict(res, released=released, gloo_threads=sorted(t for t in threads if 'gloo' in t))
