"""Rollouts with action-chunk replanning, evaluation, sweeps and serving. The only place Hydra is seen."""

from pathlib import Path


def _conf_dir() -> str:
    """The Hydra config directory: `conf/` beside the packages in a checkout (and an editable
    install), `runners/conf/` in an installed wheel (pyproject.toml maps conf/ there)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "evaluate.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"Hydra configs not found in {here / 'conf'} or {here.parent / 'conf'}: "
                            "reinstall the package (pip install .) or run from a checkout")


CONF_DIR = _conf_dir()
