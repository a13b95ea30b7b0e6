"""The node's pipeline after reception, one module per stage.

receive (`dicom_node.net.receive`) -> spool -> completion (is the series whole?) -> segment
(the worker process runs `inference`: volume -> cascade -> SEG) -> deliver; retention purges.
`state` is the one place that moves a series between states.
"""
