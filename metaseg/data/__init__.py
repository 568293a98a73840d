"""The data stage: finding image/mask pairs in a Data folder or zip (`discovery`), the patients' ground truth
(`ground_truth`), the patient split as a MONAI datalist (`datalist`) and the synthetic phantom that ships in their
place (`phantom`)."""
