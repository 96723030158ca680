"""The Waymo Open Dataset's detection classes (no dependency: read by preparation and configs)."""

#: Label order of prepared Waymo frames (label ``i`` is ``CLASS_NAMES[i]``): the ``TYPE_VEHICLE``,
#: ``TYPE_PEDESTRIAN`` and ``TYPE_CYCLIST`` objects (signs are not detected).
CLASS_NAMES: tuple[str, ...] = ("Vehicle", "Pedestrian", "Cyclist")
