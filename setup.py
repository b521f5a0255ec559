"""The one thing setup.cfg cannot declare: the hot path's C loop (kumazone/dns/_hotloop.c).

It is optional: where it cannot be built (no C compiler or no Python headers)
the install goes on, and the batched UDP port runs its Python loop instead,
which answers the same octets at about 1.5 x the CPU per answer.
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):  # recvmmsg/sendmmsg: the batched port is Linux-only
    extensions.append(
        Extension(
            "kumazone.dns._hotloop",
            ["kumazone/dns/_hotloop.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
