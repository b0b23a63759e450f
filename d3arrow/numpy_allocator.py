"""numpy's allocator in a worker's compute threads: big arrays are made in the shared arena.

A result stored in shared memory is otherwise copied there, after numpy wrote it to fresh
private pages (page faults): a pipeline of 32 MiB arrays spent a third of its time on both.
numpy lets a program choose what allocates array data (NEP 49: ``PyDataMem_SetHandler``,
kept per thread in a context variable). A compute thread of a worker with a shared store
sets one that takes arrays of ``min_bytes`` or more from the arena, whose pages are faulted
in and reused, and leaves smaller ones to libc; the store then takes such a result where it
lies (:meth:`d3arrow.store.SharedStore.put_value`).

numpy has no Python call to set the handler, so it is called through numpy's C API table
with ctypes. The handler and its callbacks are never freed: every array numpy made with
them names them until it is freed, possibly during the interpreter's shutdown.
"""

import ctypes
import logging

try:
    from numpy._core import _multiarray_umath as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import _multiarray_umath as _multiarray

logger = logging.getLogger(__name__)

MIN_BYTES = 2**20  # arrays smaller than this stay in libc's memory
_SET_HANDLER = 304  # PyDataMem_SetHandler's index in numpy's C API table (numpy >= 1.22)

_Malloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_Calloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)
_Realloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_Free = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class _Allocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("malloc", _Malloc), ("calloc", _Calloc),
                ("realloc", _Realloc), ("free", _Free)]


class _Handler(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 127), ("version", ctypes.c_uint8),
                ("allocator", _Allocator)]


_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.calloc.restype = ctypes.c_void_p
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.realloc.restype = ctypes.c_void_p
_libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _set_handler_function():
    """numpy's PyDataMem_SetHandler, or None where it cannot be found."""
    try:
        table = ctypes.cast(_capsule_pointer(_multiarray._ARRAY_API, None),
                            ctypes.POINTER(ctypes.c_void_p))
        return ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(table[_SET_HANDLER])
    except (AttributeError, ValueError) as e:
        logger.info("numpy's allocator cannot be set here (%s): results are copied", e)
        return None


_set_handler = _set_handler_function()


def arena_handler(arena, min_bytes=MIN_BYTES):
    """A numpy memory handler (a capsule for :func:`use`) that puts arrays of ``min_bytes``
    or more in ``arena`` while it has room; None where numpy's allocator cannot be set."""
    if _set_handler is None:
        return None
    allocate, holds, free = arena.allocate_raw, arena.holds_raw, arena.free_raw
    libc_malloc, libc_calloc, libc_realloc, libc_free = (
        _libc.malloc, _libc.calloc, _libc.realloc, _libc.free)
    memset, memmove = ctypes.memset, ctypes.memmove

    def arena_or_none(nbytes):
        try:
            return allocate(nbytes)
        except Exception:  # an error here would reach numpy as NULL: a MemoryError
            logger.exception("shared store allocation of %d bytes failed", nbytes)
            return None

    def malloc(ctx, size):
        if size >= min_bytes:
            address = arena_or_none(size)
            if address is not None:
                return address
        return libc_malloc(size)

    def calloc(ctx, count, size):
        nbytes = count * size
        if nbytes >= min_bytes:
            address = arena_or_none(nbytes)
            if address is not None:
                memset(address, 0, nbytes)  # the arena's pages are reused, not fresh
                return address
        return libc_calloc(count, size)

    def realloc(ctx, address, size):
        if not address or not holds(address):
            return libc_realloc(address, size)
        moved = malloc(ctx, size)
        if moved:
            memmove(moved, address, min(size, arena.raw_size(address)))
            free(address)
        return moved

    def release(ctx, address, size):
        if address and holds(address):
            free(address)
        else:
            libc_free(address)

    handler = _Handler(name=b"d3arrow-arena", version=1)
    handler.allocator = _Allocator(None, _Malloc(malloc), _Calloc(calloc),
                                   _Realloc(realloc), _Free(release))
    # Never freed (the callbacks live in its fields): arrays it made call it when they are
    # freed, maybe while the interpreter shuts down, after this module's globals are gone.
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(handler))
    return _capsule_new(ctypes.addressof(handler), b"mem_handler", None)


def use(capsule):
    """Make numpy allocate with ``capsule`` in this thread (its context) from now on."""
    _set_handler(capsule)


def handler_name(array=None):
    """The name of the handler that made ``array`` (or that this thread uses now)."""
    return _multiarray.get_handler_name(array)
