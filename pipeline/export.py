"""Stage `export`: TorchScript + ONNX generator with the signal contract inside, verified
against eager PyTorch, plus a model card; logged and registered in MLflow."""

from pathlib import Path

from segan.stage import run_stage


def main(params, args):
    from segan.export import export_generator
    export_generator(Path("data/models/generator.pt"), Path("data/models/exported"), params,
                     prepared_dir=Path("data/prepared"))


if __name__ == "__main__":
    run_stage("export", main)
