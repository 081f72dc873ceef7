// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {IAttestationQuorum} from "./interfaces/IAttestationQuorum.sol";
import {IModelRegistry} from "./interfaces/IModelRegistry.sol";
import {INodeRegistry} from "./interfaces/INodeRegistry.sol";
import {IShareToken} from "./interfaces/IShareToken.sol";

/// @title ContributionLedger
/// @notice Per model and epoch, a quorum of validators attests a Merkle root of (node, compute units). During
/// the model's challenge window a quorum-signed Fraud verdict voids one leaf (and slashes its node) or the
/// whole root; afterwards each node's leaf is claimed once with a Merkle proof, minting `units` shares to the
/// node's operator. Settlement stores one root, so its gas does not depend on the number of contributors.
contract ContributionLedger is EIP712 {
    /// @notice A submitted epoch root.
    struct Epoch {
        bytes32 root;
        uint256 totalUnits; // sum of units over all leaves
        bytes32 receiptsHash; // commitment to the receipts the root was computed from
        uint64 submittedAt; // block timestamp of submission; 0 = never submitted
        bool voided; // voided by challengeRoot
        uint256 claimedUnits; // units minted so far
    }

    /// @notice EIP-712 type hash of EpochRoot.
    bytes32 public constant EPOCH_ROOT_TYPEHASH =
        keccak256("EpochRoot(uint256 modelId,uint64 epoch,bytes32 root,uint256 totalUnits,bytes32 receiptsHash)");
    /// @notice EIP-712 type hash of Fraud; node = address(0) condemns the whole root.
    bytes32 public constant FRAUD_TYPEHASH = keccak256("Fraud(uint256 modelId,uint64 epoch,address node,bytes32 evidence)");

    /// @notice The model registry.
    IModelRegistry public immutable models;
    /// @notice The node registry.
    INodeRegistry public immutable nodes;
    /// @notice The attestation rule for roots and fraud verdicts.
    IAttestationQuorum public immutable quorum;
    /// @notice Share of a node's stake slashed for a fraudulent leaf, in basis points.
    uint16 public immutable slashBps;

    mapping(uint256 modelId => mapping(uint64 epoch => Epoch)) private _epochs;
    mapping(uint256 modelId => mapping(uint64 epoch => mapping(address node => bool))) private _leafVoided;
    mapping(uint256 modelId => mapping(uint64 epoch => mapping(address node => bool))) private _leafClaimed;

    /// @notice The model is not training.
    error ContributionLedgerModelNotTraining(uint256 modelId, IModelRegistry.Status status);
    /// @notice The root or total units is zero.
    error ContributionLedgerInvalidRoot(bytes32 root, uint256 totalUnits);
    /// @notice A live (non-voided) root already exists for this epoch.
    error ContributionLedgerEpochAlreadySubmitted(uint256 modelId, uint64 epoch);
    /// @notice No root was submitted for this epoch.
    error ContributionLedgerUnknownEpoch(uint256 modelId, uint64 epoch);
    /// @notice The quorum rejected the signatures.
    error ContributionLedgerQuorumRejected(bytes32 digest);
    /// @notice The challenge window has closed.
    error ContributionLedgerChallengeWindowClosed(uint256 modelId, uint64 epoch, uint64 closedAt);
    /// @notice The challenge window is still open.
    error ContributionLedgerChallengeWindowOpen(uint256 modelId, uint64 epoch, uint64 closesAt);
    /// @notice The root was voided.
    error ContributionLedgerRootVoided(uint256 modelId, uint64 epoch);
    /// @notice The leaf was voided.
    error ContributionLedgerLeafVoided(uint256 modelId, uint64 epoch, address node);
    /// @notice The leaf was already claimed.
    error ContributionLedgerLeafAlreadyClaimed(uint256 modelId, uint64 epoch, address node);
    /// @notice The Merkle proof does not prove the leaf.
    error ContributionLedgerInvalidProof(uint256 modelId, uint64 epoch, address node, uint256 units);
    /// @notice The node is not registered.
    error ContributionLedgerUnknownNode(address node);
    /// @notice The node is zero, or units zero.
    error ContributionLedgerInvalidLeaf(address node, uint256 units);
    /// @notice Claims would exceed the root's total units.
    error ContributionLedgerUnitsExceeded(uint256 claimed, uint256 totalUnits);
    /// @notice slashBps is above 10000.
    error ContributionLedgerInvalidSlashBps(uint16 slashBps);

    /// @notice An epoch root was submitted.
    event EpochRootSubmitted(
        uint256 indexed modelId, uint64 indexed epoch, bytes32 root, uint256 totalUnits, bytes32 receiptsHash
    );
    /// @notice A leaf was voided by a fraud verdict.
    event LeafChallenged(uint256 indexed modelId, uint64 indexed epoch, address indexed node, bytes32 evidence, uint256 slashed);
    /// @notice A root was voided by a fraud verdict.
    event RootChallenged(uint256 indexed modelId, uint64 indexed epoch, bytes32 evidence);
    /// @notice A leaf was claimed and its shares minted.
    event LeafClaimed(uint256 indexed modelId, uint64 indexed epoch, address indexed node, address operator, uint256 units);

    /// @param models_ The model registry.
    /// @param nodes_ The node registry.
    /// @param quorum_ The attestation rule.
    /// @param slashBps_ Share of stake slashed per fraudulent leaf (basis points, <= 10000).
    constructor(IModelRegistry models_, INodeRegistry nodes_, IAttestationQuorum quorum_, uint16 slashBps_)
        EIP712("PMN ContributionLedger", "1")
    {
        if (slashBps_ > 10_000) revert ContributionLedgerInvalidSlashBps(slashBps_);
        models = models_;
        nodes = nodes_;
        quorum = quorum_;
        slashBps = slashBps_;
    }

    /// @notice Submits the attested Merkle root of an epoch. A voided root may be replaced.
    /// @param modelId The model (must be training).
    /// @param epoch The epoch number.
    /// @param root Merkle root over leaves (modelId, epoch, node, units).
    /// @param totalUnits Sum of units over all leaves.
    /// @param receiptsHash Commitment to the underlying receipts.
    /// @param signatures Validator signatures over EpochRoot, sorted by signer.
    function submitEpochRoot(
        uint256 modelId,
        uint64 epoch,
        bytes32 root,
        uint256 totalUnits,
        bytes32 receiptsHash,
        bytes[] calldata signatures
    ) external {
        IModelRegistry.Status status = models.statusOf(modelId);
        if (status != IModelRegistry.Status.Training) revert ContributionLedgerModelNotTraining(modelId, status);
        if (root == bytes32(0) || totalUnits == 0) revert ContributionLedgerInvalidRoot(root, totalUnits);
        Epoch storage e = _epochs[modelId][epoch];
        if (e.submittedAt != 0 && !e.voided) revert ContributionLedgerEpochAlreadySubmitted(modelId, epoch);
        bytes32 digest = epochRootDigest(modelId, epoch, root, totalUnits, receiptsHash);
        _attest(digest, signatures);
        _epochs[modelId][epoch] = Epoch(root, totalUnits, receiptsHash, uint64(block.timestamp), false, 0);
        emit EpochRootSubmitted(modelId, epoch, root, totalUnits, receiptsHash);
    }

    /// @notice Voids one node's leaf and slashes the node, given a quorum-signed Fraud verdict, inside the window.
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param node The condemned node (non-zero).
    /// @param evidence Commitment to the evidence (e.g. hash of the failed spot check).
    /// @param signatures Validator signatures over Fraud, sorted by signer.
    function challengeLeaf(uint256 modelId, uint64 epoch, address node, bytes32 evidence, bytes[] calldata signatures)
        external
    {
        if (node == address(0)) revert ContributionLedgerInvalidLeaf(node, 0);
        _openEpoch(modelId, epoch);
        if (_leafVoided[modelId][epoch][node]) revert ContributionLedgerLeafVoided(modelId, epoch, node);
        _attest(fraudDigest(modelId, epoch, node, evidence), signatures);
        _leafVoided[modelId][epoch][node] = true;
        uint256 slashed = nodes.slash(node, (nodes.stakeOf(node) * slashBps) / 10_000, evidence);
        emit LeafChallenged(modelId, epoch, node, evidence, slashed);
    }

    /// @notice Voids a whole epoch root, given a quorum-signed Fraud verdict with node = address(0).
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param evidence Commitment to the evidence.
    /// @param signatures Validator signatures over Fraud(modelId, epoch, address(0), evidence), sorted by signer.
    function challengeRoot(uint256 modelId, uint64 epoch, bytes32 evidence, bytes[] calldata signatures) external {
        Epoch storage e = _openEpoch(modelId, epoch);
        _attest(fraudDigest(modelId, epoch, address(0), evidence), signatures);
        e.voided = true;
        emit RootChallenged(modelId, epoch, evidence);
    }

    /// @notice After the challenge window, mints a leaf's `units` shares to its node's operator; once per leaf.
    /// Anyone may call it.
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param node The node in the leaf.
    /// @param units The units in the leaf.
    /// @param proof Merkle proof of the leaf (OpenZeppelin sorted-pair tree).
    function claimLeaf(uint256 modelId, uint64 epoch, address node, uint256 units, bytes32[] calldata proof) external {
        if (node == address(0) || units == 0) revert ContributionLedgerInvalidLeaf(node, units);
        Epoch storage e = _epochs[modelId][epoch];
        if (e.submittedAt == 0) revert ContributionLedgerUnknownEpoch(modelId, epoch);
        if (e.voided) revert ContributionLedgerRootVoided(modelId, epoch);
        uint64 closesAt = e.submittedAt + models.challengeWindowOf(modelId);
        if (block.timestamp < closesAt) revert ContributionLedgerChallengeWindowOpen(modelId, epoch, closesAt);
        if (_leafVoided[modelId][epoch][node]) revert ContributionLedgerLeafVoided(modelId, epoch, node);
        if (_leafClaimed[modelId][epoch][node]) revert ContributionLedgerLeafAlreadyClaimed(modelId, epoch, node);
        bytes32 leaf = leafHash(modelId, epoch, node, units);
        if (!MerkleProof.verifyCalldata(proof, e.root, leaf)) {
            revert ContributionLedgerInvalidProof(modelId, epoch, node, units);
        }
        address operator = nodes.operatorOf(node);
        if (operator == address(0)) revert ContributionLedgerUnknownNode(node);
        uint256 claimed = e.claimedUnits + units;
        if (claimed > e.totalUnits) revert ContributionLedgerUnitsExceeded(claimed, e.totalUnits);
        e.claimedUnits = claimed;
        _leafClaimed[modelId][epoch][node] = true;
        emit LeafClaimed(modelId, epoch, node, operator, units);
        IShareToken(models.shareTokenOf(modelId)).mint(operator, units);
    }

    /// @notice The record of an epoch.
    /// @param modelId The model.
    /// @param epoch The epoch.
    function getEpoch(uint256 modelId, uint64 epoch) external view returns (Epoch memory) {
        return _epochs[modelId][epoch];
    }

    /// @notice Whether a leaf was voided.
    function isLeafVoided(uint256 modelId, uint64 epoch, address node) external view returns (bool) {
        return _leafVoided[modelId][epoch][node];
    }

    /// @notice Whether a leaf was claimed.
    function isLeafClaimed(uint256 modelId, uint64 epoch, address node) external view returns (bool) {
        return _leafClaimed[modelId][epoch][node];
    }

    /// @notice The EIP-712 domain separator (for off-chain signers).
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @notice The EIP-712 digest validators sign for an epoch root.
    function epochRootDigest(uint256 modelId, uint64 epoch, bytes32 root, uint256 totalUnits, bytes32 receiptsHash)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(EPOCH_ROOT_TYPEHASH, modelId, epoch, root, totalUnits, receiptsHash)));
    }

    /// @notice The EIP-712 digest validators sign for a fraud verdict.
    function fraudDigest(uint256 modelId, uint64 epoch, address node, bytes32 evidence) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(FRAUD_TYPEHASH, modelId, epoch, node, evidence)));
    }

    /// @notice The Merkle leaf of (modelId, epoch, node, units), OpenZeppelin StandardMerkleTree encoding.
    function leafHash(uint256 modelId, uint64 epoch, address node, uint256 units) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(modelId, epoch, node, units))));
    }

    function _openEpoch(uint256 modelId, uint64 epoch) private view returns (Epoch storage e) {
        e = _epochs[modelId][epoch];
        if (e.submittedAt == 0) revert ContributionLedgerUnknownEpoch(modelId, epoch);
        if (e.voided) revert ContributionLedgerRootVoided(modelId, epoch);
        uint64 closesAt = e.submittedAt + models.challengeWindowOf(modelId);
        if (block.timestamp >= closesAt) revert ContributionLedgerChallengeWindowClosed(modelId, epoch, closesAt);
    }

    function _attest(bytes32 digest, bytes[] calldata signatures) private view {
        if (!quorum.verify(digest, signatures)) revert ContributionLedgerQuorumRejected(digest);
    }
}
