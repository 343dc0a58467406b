"""MXNet / InsightFace RecordIO (``.rec`` + ``.idx`` + ``.lst``): reader, writer and folder packer."""

from data.recordio.reader import *  # noqa: F403
from data.recordio.reader import __doc__ as __doc__
