from lightning_ood.cli import entrypoint

entrypoint()
