"""A second random program generator: random, valid PyTorch programs written as ordinary Python.

Written independently of :mod:`fxrebirth.testing.graphs` (which builds fx graphs): every program here is
an ``nn.Module`` whose ``forward`` is generated Python SOURCE, the kind of code a user writes, run by
eager PyTorch as the reference. :func:`random_program` draws one from a seed (``random.Random``: the
same seed gives the same program on every machine).

A program is a small random DAG over a 1-D (N, C, L), 2-D (N, C, H, W) or 3-D (N, C, D, H, W) input
(one or two inputs), float32 or float64, built from: convolutions (random kernel, stride, padding,
dilation, groups, bias, padding mode), transposed convolutions, BatchNorm in eval with random statistics
(and now and then without running statistics, or GroupNorm), Linear after a flatten or a global pool
(and on channels-last permutes), per-channel constant scale/shift, ReLU in every spelling (module,
``inplace=True``, ``F.relu(inplace=True)``, ``relu_()``) and other activations, in-place arithmetic
(``add_``, ``mul_``, ``+=``, ``out=``) on intermediate values and on the inputs -- the mutated value
is often read by another branch before the mutation and again after it -- residual adds/subs (with
broadcast: global-pooled (N, C, 1, 1) and channel-mean (N, 1, H, W) branches), RepVGG-style parallel
branches, concatenation, average/max pooling (ceil mode, count_include_pad, divisor_override), adaptive
pooling, explicit padding (constant, reflect, replicate, circular), reshapes/views/flatten/permute
(some with literal sizes taken from the nominal size: size-specific by design), channel shuffles,
pixel (un)shuffle, dropout (eval), identities, clones/aliases, a module called twice, tuple and dict
outputs.

Validity: the program is built by running every line as it is generated (a trial on copies first, so an
invalid line is dropped), then run as a whole at its nominal size (batch 1, 2 and 3, with and without
autograd): a program that fails there is drawn again. It is also run at two larger sizes: a program that
fails there (literal reshapes, Linear after a flatten...) records it in :attr:`Program.runs_at`, and
checks skip those sizes.

:func:`check_program` is the end-to-end check (fxrebirth's contract: match the original at every size
it accepts, or raise a clear error; never modify the user's model or example inputs); the functions it
calls are passed in, so the same check runs against older versions of fxrebirth.

The generator is a package: :mod:`.program` (:class:`Program`, the limits), the builder in parts
(:mod:`.core`: state, draws and the trial of each line; :mod:`.layers`, :mod:`.elementwise`,
:mod:`.shaping`: the kinds of line; :mod:`.blocks`: multi-line blocks), :mod:`.generator`
(:func:`random_program`) and :mod:`.check` (:func:`check_program`).
"""

from __future__ import annotations

from tests.support.programs.check import Outcome, check_options, check_program
from tests.support.programs.generator import random_program
from tests.support.programs.program import CHECK_BATCHES, NOMINAL_BATCH, Program

__all__ = ["Program", "Outcome", "random_program", "check_program", "check_options", "NOMINAL_BATCH",
           "CHECK_BATCHES"]
