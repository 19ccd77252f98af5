"""RadLex ids of the VISCERAL Anatomy3 structures, shared by preparation and the synthetic phantoms."""

__all__ = ["RADLEX_IDS"]

#: structure name -> RadLex id, as in the VISCERAL Anatomy3 file names
RADLEX_IDS = {
    "liver": 58,
    "spleen": 86,
    "pancreas": 170,
    "gallbladder": 187,
    "urinary bladder": 237,
    "aorta": 480,
    "trachea": 1247,
    "right lung": 1302,
    "left lung": 1326,
    "first lumbar vertebra": 29193,
    "right kidney": 29662,
    "left kidney": 29663,
    "right adrenal gland": 30324,
    "left adrenal gland": 30325,
    "right psoas major": 32248,
    "left psoas major": 32249,
}
