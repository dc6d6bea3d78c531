"""Liger-Kernel's process-wide patches of a Llama, undone afterwards: shared by tests/test_coexistence.py and
benchmarks/check_coexistence_gpu.py.

``apply_liger_kernel_to_llama()`` reassigns attributes of transformers' ``modeling_llama`` module (``LlamaRMSNorm``,
``LlamaMLP``, ``apply_rotary_pos_emb``), of ``LlamaForCausalLM`` (its ``forward``) and, with ``cross_entropy=True``,
of ``torch.nn.functional`` -- for every model built afterwards in the process. :func:`liger_patches` puts every
attribute back and checks that it did, so later code sees transformers as it was."""
import contextlib


def _liger_targets() -> list:
    """What Liger's patches of a Llama may reassign: the modeling module's globals, the causal LM's class dict,
    and the ``torch.nn.functional`` transformers' loss module calls."""
    from transformers.loss import loss_utils
    from transformers.models.llama import modeling_llama

    return [modeling_llama, modeling_llama.LlamaForCausalLM, loss_utils.nn.functional]


@contextlib.contextmanager
def liger_patches(**kwargs):
    """``apply_liger_kernel_to_llama(**kwargs)`` inside; every attribute it added or reassigned put back outside
    (checked)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    targets = _liger_targets()
    before = [dict(vars(t)) for t in targets]
    try:
        apply_liger_kernel_to_llama(**kwargs)
        yield
    finally:
        for target, saved in zip(targets, before):
            for name in set(vars(target)) - set(saved):
                delattr(target, name)
            for name, value in saved.items():
                if vars(target).get(name) is not value:
                    setattr(target, name, value)
        for target, saved in zip(targets, before):
            changed = [n for n in set(vars(target)) | set(saved) if vars(target).get(n) is not saved.get(n)]
            assert not changed, f"{target}: {changed} not restored"
