"""The public API in dsl/__init__.py: every name resolves to its one home, and ``import dsl`` stays light."""

import subprocess
import sys


def test_public_names_are_the_objects_of_their_home_modules():
    import dsl.config
    import dsl.models.loading
    import dsl.sampling
    import dsl.train

    homes = {"Trainer": dsl.train, "generate": dsl.sampling, "load_denoiser": dsl.sampling,
             "load_run": dsl.models.loading}
    for name in dsl.__all__:
        if name == "__version__":
            continue
        assert getattr(dsl, name) is getattr(homes.get(name, dsl.config), name), name
        assert name in dir(dsl)
    assert {"Trainer", "generate", "load_denoiser", "load_run", "RunConfig", "JobConfig", "SamplingConfig"} \
        <= set(dsl.__all__)


def test_generate_through_the_public_api():
    from dsl import SamplingConfig, generate, load_denoiser

    cfg = SamplingConfig(sampler="mdlm", steps=4)
    batch = generate(load_denoiser("oracle:hmm", cfg, length=8), cfg, n=2, length=8, seed=0)
    assert tuple(batch.ids.shape) == (2, 8)


def test_import_dsl_loads_no_torch_and_unknown_names_fail():
    probe = "import sys, dsl, dsl.errors; assert 'torch' not in sys.modules; print(getattr(dsl, 'nope', 'absent'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "absent", out.stderr
