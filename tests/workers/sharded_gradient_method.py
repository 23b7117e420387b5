"""Run under torchrun (2 processes): train with TorchRec-sharded tables and a gradient method
(PCGrad) through the Trainer; each process writes its dense parameters (everything but the
sharded tables) to OUT/dense<rank>.pt, so the test can check that the processes stay one model."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from mtlrec.config import load_config
from mtlrec.experiment import encode_splits
from mtlrec.trained import TrainedModel
from mtlrec.train.trainer import Trainer


def main(config_path: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    cfg = load_config(yaml.safe_load(config_path.read_text()))
    encoded = encode_splits(cfg)
    encoder, train, valid = encoded.encoder, encoded.train, encoded.valid
    torch.manual_seed(cfg.seed)
    trainer = Trainer(TrainedModel.build(cfg, encoder).model, encoder.schema, cfg.train, seed=cfg.seed)
    trainer.fit(train, valid)
    dense = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if ".embedding_bags." not in name}
    torch.save(dense, out / f"dense{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
