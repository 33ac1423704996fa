"""A GDB remote stub whose every guest byte goes through the debug-access layer.

``packets`` frames the Remote Serial Protocol, ``target`` describes the vCPU registers
(x86-64 / i386, QEMU's order), ``session`` answers one gdb connection, ``server`` listens
(``tcp:HOST:PORT`` / ``unix:PATH``, QEMU's ``-gdb`` syntax), ``machine_thread`` is the one
place that hands work to the machine thread, and ``hmp`` adds QEMU's ``gdbserver`` command.
"""
