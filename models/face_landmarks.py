"""Facts about MediaPipe's 468-point face mesh: which indices are which part of the face.

Every module that picks points out of a mesh (alignment, masks, the speaker choice, the sync expert,
the eval's LMD) takes its indices from here, so one name always means one set of points.
"""

from __future__ import annotations

import numpy as np

MESH_POINTS = 468  # the mesh without iris points
# Points that do not move when the person speaks: eye corners, nose bridge, nose base. Mouth and jaw
# points are left out on purpose, or every syllable would shake the crop.
RIGID = np.array([33, 133, 362, 263, 168, 6, 2])
# Their place on a frontal face, in units of the distance between the eye centres, origin between
# the eyes (generic proportions: mean of the mesh on frontal faces, made symmetric).
RIGID_TEMPLATE = np.array(
    [[-0.73, -0.015], [-0.27, 0.015], [0.27, 0.015], [0.73, -0.015], [0.0, -0.07], [0.0, 0.08], [0.0, 0.82]]
)
EYES = (np.array([33, 133]), np.array([362, 263]))  # outer + inner corner of each eye
LIPS_INNER = (13, 14)  # upper and lower inner lip, centre
MOUTH_CORNERS = (78, 308)
CHIN = 152
CHEEKS = (234, 454)  # face outline at cheekbone height, image left and right
# Face outline from the left cheek at nose height, under the chin, to the right cheek: the lower
# half of MediaPipe's FACEMESH_FACE_OVAL.
LOWER_OVAL = np.array([93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323])
NOSE_BASE = np.array([129, 98, 97, 2, 326, 327, 358])
LIPS_OUTER = np.array([61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146])
LIPS_INNER_RING = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
# The sync expert's input: both lip contours (40 points).
LIP_CONTOUR_POINTS = (*(int(i) for i in LIPS_OUTER), *LIPS_INNER_RING)
# The eval's landmark distance (LMD): outer contour, inner lip centres and mouth corners.
LMD_POINTS = np.array([*LIPS_OUTER, *LIPS_INNER, *MOUTH_CORNERS])
