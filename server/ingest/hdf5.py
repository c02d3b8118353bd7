"""What an uploaded HDF5 file (a legacy ``.h5`` model, a ``.keras`` archive's weights) holds, checked without reading
its data: where its data lies and how much of it there is."""

from __future__ import annotations

from typing import Any

from leanserve.server.errors import InvalidArgument


def refuse_outside_data(f: Any) -> None:
    """InvalidArgument for anything in the open HDF5 file ``f`` whose data lies elsewhere: an external link, or a
    dataset with external storage or a virtual one, would make Keras read files of the server (Keras refuses some of
    them itself; this does not depend on its version)."""
    import h5py

    # the callbacks return what they found, which stops the walk (raising inside one breaks h5py's lock)
    def link(name: str, target: Any) -> str | None:
        return name if isinstance(target, h5py.ExternalLink) else None

    def dataset(name: str, obj: Any) -> str | None:
        return name if isinstance(obj, h5py.Dataset) and (obj.external or obj.is_virtual) else None

    found = f.visititems_links(link)
    if found is not None:
        raise InvalidArgument(f"not a valid Keras file: HDF5 link {found[:80]!r} points into another file")
    found = f.visititems(dataset)
    if found is not None:
        raise InvalidArgument(f"not a valid Keras file: HDF5 dataset {found[:80]!r} keeps its data outside the file")


def count_datasets(group: Any) -> tuple[int, int]:
    """(values, bytes) of every dataset under ``group``, from their shapes (nothing is read)."""
    import h5py

    values = nbytes = 0

    def visit(_name: str, obj: Any) -> None:
        nonlocal values, nbytes
        if isinstance(obj, h5py.Dataset):
            values += int(obj.size)
            nbytes += int(obj.size) * int(obj.dtype.itemsize)

    group.visititems(visit)
    return values, nbytes
