"""The evaluation stage: metrics of one patient and statistics over patients (`metrics`), a run's evaluated masks
(`runs`), out-of-fold probabilities of `metaseg cv` (`out_of_fold`), the selection of inference steps on them
(`selection`), the summaries and tables every report shares (`reports`), figures (`figures`), and the two reports:
`metaseg compare` of two runs (`comparison`) and the cross-validation's (`cv_report`); training recipes compared by
patient over seeds (`recipes`, its tables `recipe_markdown`), and how every recipe comparison prints a paired
difference (`paired`)."""
