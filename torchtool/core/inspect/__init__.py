"""inspect: a model's size and cost (summary) and its speed (profile).

- :mod:`~torchtool.core.inspect.inputs`: ``--input-size`` and ``--dtype``, shared by both.
- :mod:`~torchtool.core.inspect.tracking`: module hooks (output shapes, the failing layer) and live-memory tracking.
- :mod:`~torchtool.core.inspect.graph`: the autograd graph as Graphviz DOT.
- :mod:`~torchtool.core.inspect.summary`: :func:`summarize`, summary's one call.
"""

# profile --compare's speed tips (here, light, so that tab completion offers them without importing torch)
TIPS = ("channels_last", "bf16", "fp16", "cudnn_benchmark", "compile", "inference_mode", "fold_bn")
