"""Weight patchers for the Ray engine tests (``actor.WeightPatcher`` without ComfyUI). They live in a module the
actors can import by this name (the repository is on their path); a class defined in a test module would be
pickled under pytest's name for it, which starts with the checkout's folder and does not import in an actor."""

from __future__ import annotations


class AddDiff:
    """Each key's patch list holds one tensor added to the weight."""

    def load(self, blob: bytes) -> dict:
        """The engine's own serialisation (Ray's, between ComfyUI and its actors), as nodes/weight_patch.py reads it."""
        import ray.cloudpickle

        return ray.cloudpickle.loads(blob)

    def __call__(self, weight_fp32, patches, key, like):
        return (weight_fp32 + patches[0]).to(like.dtype)

    def at_forward(self, patches, key):
        """For a GGUF layer: the tensor added to the dequantized weight in each forward."""
        return lambda weight: weight + patches[0].to(weight)
