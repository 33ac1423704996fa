"""Monitor commands: the QMP handlers, and the HMP table built on the same functions.

Each module covers one area (control, run state, SEV, memory, dump, the SEV memory map, migration). QMP handlers
take ``(ctx, **arguments)`` already checked against ``schemas/``; HMP handlers print text and call the same
functions, turning a CommandError into QEMU's ``Error: ...`` line. ``registry.build`` registers them all.
"""
