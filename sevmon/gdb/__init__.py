"""A GDB remote stub whose every guest byte goes through the debug-access layer.

``packets`` frames the Remote Serial Protocol, ``target`` describes the vCPU registers
(x86-64 / i386, QEMU's order), ``session`` answers one gdb connection, ``no_registers``
what gdb gets of a vCPU whose registers no one can read (SEV-ES), ``server`` listens
(``tcp:HOST:PORT`` / ``unix:PATH``, QEMU's ``-gdb`` syntax) and ``hmp`` adds QEMU's ``gdbserver`` command.
Every guest access runs on the machine thread that QMP and HMP share (``sevmon.machine.runner``).
"""
