"""The image stack (PCEE-BERT section 4.6.4): CIFAR data (`images`), the multi-exit ResNet-56
(`resnet`), its training (`config`, `train`, on the shared loop of `jaxexit.training`) and the
vision model (`model.VisionExitModel`, a `RampModel`) that runs it through the same runners,
policies and offline layer as text.

May import: `jaxexit.exits`, `jaxexit.training`.
"""
